"""Packed files notice their own corruption (integrity.py); through the CLIs in test_cli_ipq.py."""
import zlib

import pytest
import torch

from quant_noise_plugin.integrity import CHECKSUM_KEY, IntegrityError, looks_packed, pop_and_verify, with_checksums


def _state():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 4, generator=g).half()
    return {"a.weight_pq.codes_packed": torch.randint(0, 255, (16,), dtype=torch.uint8, generator=g),
            "a.weight_pq.centroids": shared, "b.weight_pq.centroids": shared, "c.bias": torch.randn(3, generator=g),
            "d.version": torch.tensor([1.0]), "e.empty": torch.empty(0)}


def test_round_trip_verifies_and_keeps_shared_tensors_shared():
    state = with_checksums(_state())
    assert state["a.weight_pq.centroids"] is state["b.weight_pq.centroids"]
    assert pop_and_verify(state) is True and CHECKSUM_KEY not in state
    assert pop_and_verify(_state()) is None  # a file written before checksums


def test_every_flipped_byte_of_every_tensor_is_caught():
    clean = with_checksums(_state())
    for key in (k for k in clean if k != CHECKSUM_KEY):
        raw = clean[key].reshape(-1).view(torch.uint8)
        for i in range(raw.numel()):
            for bit in (0x01, 0x80):
                damaged = dict(clean)
                flipped = raw.clone()
                flipped[i] ^= bit
                damaged[key] = flipped.view(clean[key].dtype).reshape(clean[key].shape)
                with pytest.raises(IntegrityError, match=f"file.pt: tensor {key} fails its checksum"):
                    pop_and_verify(damaged, "file.pt")


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("c.bias"), "tensor names or count differ"),
    (lambda s: s.update({"c.bias2": s.pop("c.bias")}), "tensor names or count differ"),
    (lambda s: s.update({"c.bias": s["c.bias"].double()}), "tensor c.bias fails its checksum"),  # same values, other dtype
    (lambda s: s.update({"c.bias": s["c.bias"].reshape(3, 1)}), "tensor c.bias fails its checksum"),
    (lambda s: s.update({CHECKSUM_KEY: s[CHECKSUM_KEY].float()}), "checksum table is damaged"),
])
def test_renamed_missing_or_reshaped_tensors_are_caught(damage, message):
    state = with_checksums(_state())
    damage(state)
    with pytest.raises(IntegrityError, match=message) as err:
        pop_and_verify(state, "file.pt")
    assert "\n" not in str(err.value)


def test_packed_state_dicts_are_told_from_training_ones():
    assert looks_packed(_state())
    assert not looks_packed({"a.weight_pq.centroids": torch.zeros(4, 2), "a.weight_pq.codes": torch.zeros(8, dtype=torch.uint8)})
    assert looks_packed({"a.weight_int.codes": torch.zeros(8, dtype=torch.uint8)})  # int8 weights: a packed file's only
    assert looks_packed({"a.weight_pq.centroids_codes": torch.zeros(4, 2, dtype=torch.uint8)})  # int centroids
    assert looks_packed({"a.weight_pq.centroids": torch.zeros(4, 2).half()})  # fp16 centroids


def test_a_file_packed_before_checksums_is_noticed_once_per_process(caplog):
    """As a fresh process sees it: the module run anew (its own objects put back after, for the other tests)."""
    import importlib

    from quant_noise_plugin import integrity

    saved = dict(integrity.__dict__)
    try:
        importlib.reload(integrity)
        with caplog.at_level("WARNING", logger="quant_noise_plugin.integrity"):
            integrity.notice_unverified("old.pt")
            integrity.notice_unverified("older.pt")
    finally:
        integrity.__dict__.clear()
        integrity.__dict__.update(saved)
    assert [r.getMessage() for r in caplog.records] == [
        "old.pt: packed before checksums (quant-noise < format 2): its contents cannot be verified"]


def test_the_config_checksum_covers_everything_but_the_tensors_in_any_key_order():
    from quant_noise_plugin.integrity import config_crc32

    state = {"cfg": {"a": 1, "b": [2, 3]}, "task_state": {"x": "y"}, "model": {"w": torch.zeros(2)}}
    same = {"task_state": {"x": "y"}, "cfg": {"b": [2, 3], "a": 1}, "model": {"w": torch.ones(2)}, "last_optimizer_state": {}}
    assert config_crc32(state) == config_crc32(same)  # key order and the tensors do not count
    assert config_crc32(state) != config_crc32({**state, "cfg": {"a": 2, "b": [2, 3]}})
    assert config_crc32(state) == zlib.crc32(b'{"cfg": {"a": 1, "b": [2, 3]}, "task_state": {"x": "y"}}')


def test_a_file_verified_when_read_is_not_hashed_again(tmp_path, monkeypatch):
    """fairseq's checkpoint read (wrapped by checkpoint_guard) verifies a checksummed model state once and hands the
    model a VerifiedStateDict without the table; a damaged tensor still fails there."""
    from fairseq import checkpoint_utils

    import quant_noise_plugin  # noqa: F401  (installs the guard)
    from quant_noise_plugin import integrity

    model = with_checksums({"a.weight": torch.randn(4, 4), "b.bias": torch.randn(4)})
    history = [{"criterion_name": "x", "optimizer_name": "x", "lr_scheduler_state": {}, "num_updates": 0}]
    rest = {"cfg": None, "optimizer_history": history, "extra_state": {"train_iterator": None}}
    torch.save({"model": model, **rest}, tmp_path / "ok.pt")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "ok.pt"))
    assert isinstance(state["model"], integrity.VerifiedStateDict) and CHECKSUM_KEY not in state["model"]
    calls = []
    monkeypatch.setattr(integrity, "tensor_crc32", lambda t: calls.append(t) or 0)
    assert pop_and_verify(state["model"]) is True and not calls
    monkeypatch.undo()
    bad = dict(model)
    bad["a.weight"] = bad["a.weight"].clone()
    bad["a.weight"][0, 0] += 1
    torch.save({"model": bad, **rest}, tmp_path / "bad.pt")
    with pytest.raises(IntegrityError, match="tensor a.weight fails its checksum"):
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "bad.pt"))
