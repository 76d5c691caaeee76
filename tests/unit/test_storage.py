"""The storage client on file:// (the S3 path is covered against SeaweedFS in tests/trainer)."""

from __future__ import annotations

from pathlib import Path

from kubetune_trainer import storage


def test_round_trip_list_download_and_delete(tmp_path: Path) -> None:
    root = (tmp_path / "store").as_uri()
    local = tmp_path / "local"
    (local / "adapter").mkdir(parents=True)
    (local / "adapter" / "weights.bin").write_bytes(b"w" * 10)
    (local / "report.md").write_text("# report")
    uploaded = storage.upload_dir(local, f"{root}/run")
    assert [(u.path, u.size) for u in uploaded] == [("adapter/weights.bin", 10), ("report.md", 8)]
    assert storage.list_keys(f"{root}/run") == ["adapter/weights.bin", "report.md"]
    assert (
        storage.download(f"{root}/run/adapter", tmp_path / "back")
        .joinpath("weights.bin")
        .read_bytes()
        == b"w" * 10
    )

    storage.delete(f"{root}/run/report.md")
    storage.delete(f"{root}/run/report.md")  # deleting what is gone is not an error
    assert not storage.exists(f"{root}/run/report.md")
    assert storage.delete_prefix(f"{root}/run") == 1
    assert storage.list_keys(f"{root}/run") == []
