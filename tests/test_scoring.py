"""The segmentation score records: read from a finished piece, kept in row files and read back, summarised over
seeds."""

import json

import pytest

from asyndgan.experiments.scoring import RowScore, SeedScore


def _piece(folder, dice: dict[str, float], hd95: float, collapsed: bool = False):
    (folder / "eval").mkdir(parents=True)
    (folder / "model").mkdir()
    rows = "\n".join(f"{c},{d}" for c, d in dice.items())
    (folder / "eval" / "per_patient.csv").write_text(f"case,dice\n{rows}\n")
    mean = sum(dice.values()) / len(dice)
    (folder / "eval" / "summary.json").write_text(json.dumps({"dice": {"mean": mean, "sd": 0.1},
                                                              "hd95_mm": {"mean": hd95}}))
    (folder / "model" / "training.json").write_text(json.dumps({"collapsed": collapsed}))
    return folder


def test_a_finished_piece_reads_back_with_its_seed_means_and_patients(tmp_path):
    score = SeedScore.read(_piece(tmp_path / "row" / "seed7", {"A": 0.5, "B": 0.9}, 12.5, collapsed=True))
    assert (score.seed, score.dice, score.hd95_mm, score.collapsed) == (7, pytest.approx(0.7), 12.5, True)
    assert score.patients == {"A": 0.5, "B": 0.9}


def test_a_score_survives_the_row_file_and_reads_what_older_runs_wrote(tmp_path):
    score = SeedScore.read(_piece(tmp_path / "seed1", {"A": 0.25, "B": 0.75}, 3.0))
    again = SeedScore.from_json(json.loads(json.dumps(score.as_json())))
    assert again == score
    older = {"summary": score.summary, "patients": {"A": 0.25, "B": 0.75}, "collapsed": False, "seed": "seed1",
             "hd95": 3.0}  # what a row file held before the records existed
    assert SeedScore.from_json(older) == score


def test_a_row_averages_patients_over_seeds_and_spreads_between_seeds():
    def seed(s, a, b, collapsed=False):
        return SeedScore(seed=s, dice=(a + b) / 2, hd95_mm=float(s), patients={"A": a, "B": b}, collapsed=collapsed,
                         summary={})

    row = RowScore.of([seed(0, 0.2, 0.4), seed(1, 0.6, 0.8, collapsed=True), seed(2, 0.4, 0.6)])
    assert row.dice_per_seed == pytest.approx([0.3, 0.7, 0.5])
    assert row.dice == pytest.approx(0.5) and row.dice_sd == pytest.approx(0.2)
    assert row.patients == pytest.approx({"A": 0.4, "B": 0.6})
    assert (row.hd95_mm, row.collapsed) == (pytest.approx(1.0), 1)
    assert RowScore.of([seed(0, 0.2, 0.4)]).dice_sd == 0.0
    assert set(row.as_json()) == {"dice_per_seed", "dice", "dice_sd", "hd95", "collapsed", "patients"}
    with pytest.raises(ValueError):
        RowScore.of([])


def test_a_shared_folder_is_written_once_while_a_second_process_waits(tmp_path):
    """Two processes of one experiment start together: the second waits for the first's phantom instead of
    removing it half-written (flock holds between threads too: each opens the lock file itself)."""
    import threading
    import time

    from asyndgan.experiments.pieces import written_once

    calls = []

    def write(folder):
        calls.append(folder)
        folder.mkdir()
        time.sleep(0.3)  # the second caller arrives while this one writes
        (folder / "case.nii.gz").write_text("whole")

    root = tmp_path / "phantom"
    threads = [threading.Thread(target=written_once, args=(root, write)) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert calls == [root] and (root / "case.nii.gz").read_text() == "whole"
    assert (tmp_path / "phantom.done").is_file()

    (tmp_path / "phantom.done").unlink()  # an interrupted write: what it left is removed and written again
    (root / "stray").write_text("half")
    written_once(root, write)
    assert len(calls) == 2 and not (root / "stray").exists()
