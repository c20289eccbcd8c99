"""Rows-done bookkeeping of unfinished stores: intervals, batches cut at fixed multiples, shares, union of files."""

from __future__ import annotations

import json

from hada.features import progress


def test_intervals_batches_and_shares():
    assert progress.merge([[5, 8], [0, 3], [3, 4], [7, 10], [12, 12]]) == [[0, 4], [5, 10]]
    assert progress.missing([[0, 4], [5, 10]], 12) == [(4, 5), (10, 12)]
    assert progress.batches([(3, 17)], 8) == [(3, 8), (8, 16), (16, 17)]  # cut where an uninterrupted run cuts
    items = list(range(7))
    assert [progress.share(items, r, 3) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert progress.share([1], 1, 2) == []


def test_rows_done_is_the_union_of_every_process_and_of_old_chunk_files(tmp_path):
    (tmp_path / "progress-0.json").write_text(json.dumps({"images": [[0, 8]], "captions": []}))
    (tmp_path / "progress-1.json").write_text(json.dumps({"images": [[16, 24]], "captions": [[0, 32]]}))
    (tmp_path / "progress.json").write_text(json.dumps({"image_chunks": 2, "caption_chunks": 0}))
    done = progress.rows_done(tmp_path, {"images": 4, "captions": 32})
    assert done == {"images": [[0, 8], [16, 24]], "captions": [[0, 32]]}
    mine = progress.RankProgress(tmp_path, 1)
    mine.add("images", 24, 30)
    mine.save()
    assert progress.rows_done(tmp_path, {"images": 4, "captions": 32})["images"] == [[0, 8], [16, 30]]
    progress.clear(tmp_path)
    assert not list(tmp_path.iterdir())


def test_distributed_helpers_answer_as_the_only_process_outside_torchrun(monkeypatch):
    from hada import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.session("cpu"):
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        distributed.barrier()
        assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
        assert not distributed.launched()
