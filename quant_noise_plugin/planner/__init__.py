"""The size-budget planner, one idea a file: menus, measure, knapsack, schedule_yaml, depth (budget.py runs them)."""
