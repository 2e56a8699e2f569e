"""Mistakes a user can make on the command line: each is one line on stderr, exit code 2, no
traceback, and every file of the store is as it was (issue 15)."""

import contextlib
import hashlib
import os
import shutil
import subprocess

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tasks.score import import_scores
from tests.support.scores import synthetic_score_table
from cli.main import main
from tia2.errors import UserError
from tia2.store import Store


def store_files(store: Store) -> dict[str, str]:
    """Every file of the store (tables, parts, catalog, images) by path, with its content's hash.
    Lock files are left out: taking a lock opens them for writing, without changing them."""
    return {str(p.relative_to(store.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.root.rglob("*")) if p.is_file() and p.parent.name != ".locks"}


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture
def inputs(tmp_path, image_store):
    """The store with scores of one model, and the wrong input files of the cases below."""
    rows = synthetic_score_table(image_store, {"tiny-clip": 1.0}, seed=0)
    pq.write_table(rows, tmp_path / "scores.parquet")
    import_scores(image_store, tmp_path / "scores.parquet")
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "header_only.csv").write_text("set,image,prompt,reward_model,score\n")
    scores = rows.column("score").to_pylist()
    pq.write_table(rows.set_column(4, "score", pa.array([99.0, *scores[1:]])), folder / "changed.parquet")
    pacsv.write_csv(rows.set_column(4, "score", pa.array(["abc", *map(str, scores[1:])])), folder / "abc.csv")
    (folder / "pool.csv").write_text("id,file\n1,cat.png\n2,dog.png\n")
    for name in ("text", "truncated", "missing", "good"):
        (folder / name / "a cat").mkdir(parents=True)
    (folder / "text" / "a cat" / "0.png").write_text("not an image, despite its name")
    Image.new("RGB", (64, 64), "red").save(folder / "good" / "a cat" / "0.png")
    png = (folder / "good" / "a cat" / "0.png").read_bytes()
    (folder / "truncated" / "a cat" / "0.png").write_bytes(png[:len(png) // 2])
    (folder / "missing" / "a cat" / "0.png").symlink_to(folder / "nowhere.png")  # an unreadable file, even for root
    (folder / "out").mkdir()
    return folder


# (command line after `tia2 --store STORE`; {in} is the folder of wrong input files), words of the message
CASES = [
    (["score", "--reward-model", "tiny-clip", "--batch-size", "-1"], "--batch-size: must be a whole number of at least 1"),
    (["score", "--reward-model", "tiny-clip", "--batch-size", "0"], "--batch-size: must be a whole number of at least 1"),
    (["score", "--reward-model", "tiny-clip", "--device", "foo"], "--device: unknown device 'foo'"),
    (["score", "--reward-model", "tiny-clip", "--device", "cuda:99"], "device 'cuda:99': this machine has"),
    pytest.param(["score", "--reward-model", "tiny-clip", "--device", "cuda"], "this machine has no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    (["score", "--reward-model", "tiny-clip", "--set", "nosuchset"], "no image files in set(s) nosuchset"),
    (["generate", "--model", "tiny-sd", "--set", "nosuchset"], "no prompts in set(s) nosuchset"),
    (["generate", "--model", "tiny-sd", "--max-prompts", "-1"], "--max-prompts: must be a whole number of at least 1"),
    (["generate", "--model", "tiny-sd", "--guidance", "nan"], "--guidance: must be a finite number (got 'nan')"),
    (["generate", "--model", "tiny-sd", "--batch-size", "0"], "--batch-size: must be a whole number of at least 1 or auto"),
    (["generate", "--model", "tiny-sd", "--device", "foo"], "--device: unknown device 'foo'"),
    (["finetune", "--algo", "rwr", "--reward", "tiny-clip", "--model", "tiny-sd", "--learning-rate", "nan"],
     "--learning-rate: must be a finite number above 0"),
    (["import-scores", "{in}/header_only.csv"], "nothing to import: the file has no rows"),
    (["import-scores", "{in}/changed.parquet"], "1 rows have another score than the one stored"),
    (["import-scores", "{in}/abc.csv"], "1 rows have a score that is not a number (first: row 1: 'abc')"),
    (["metrics", "--reward", "textnorm(tiny-clip)"], "textnorm() needs tau=T"),
    (["metrics", "--reward", "mean(" * 3000 + "tiny-clip"], "nested more than 50 functions deep"),
    (["metrics", "--reward", "tiny-clip", "--out", "{in}/out"], "is a folder: give a file name"),
    (["sample-prompts", "--pool", "{in}/pool.csv"], "no column named text, prompt or caption (columns: id, file)"),
    (["import-images", "--set", "mine", "{in}/text"], "0.png: not an image file"),
    (["import-images", "--set", "mine", "{in}/truncated"], "0.png: does not decode"),
    (["import-images", "--set", "mine", "{in}/missing"], "0.png: cannot read it (No such file or directory)"),
    (["import-images", "--set", "", "{in}/good"], "--set: a set name must be non-empty"),
    (["sample-prompts", "--pool", "{in}/pool.csv", "--set-name", " "], "--set-name: a set name must be non-empty"),
]


@pytest.mark.parametrize("argv, message", CASES)
def test_a_mistake_is_one_line_and_changes_nothing(image_store, inputs, capsys, argv, message):
    before = store_files(image_store)
    code, err = run(["--store", str(image_store.root), *(a.replace("{in}", str(inputs)) for a in argv)], capsys)
    assert code == 2, err
    assert err.startswith(f"tia2 {argv[0]}: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert store_files(image_store) == before
    assert not list((inputs / "out").iterdir())  # no temporary file left behind


@contextlib.contextmanager
def unwritable(folder):
    """`folder` and everything in it, unwritable for this process: by permissions for a user; as
    root, whom permissions do not stop, by the immutable attribute (or the test is skipped)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for path, mode in modes.items():
            path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root, whom permissions do not stop, and `chattr +i` is not permitted here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)


@pytest.mark.parametrize("argv", [
    ["import-scores", "{tmp}/scores.parquet"],
    ["import-images", "--set", "counting", "{tmp}/images/counting"],
    ["sample-prompts", "--synthetic", "counting"],
    ["score", "--reward-model", "tiny-clip"],
])
def test_a_read_only_store_is_one_line_and_stays_as_it_was(tmp_path, image_store, capsys, argv):
    pq.write_table(synthetic_score_table(image_store, {"tiny-clip": 1.0}), tmp_path / "scores.parquet")
    before = store_files(image_store)
    with unwritable(image_store.root):
        code, err = run(["--store", str(image_store.root), *(a.replace("{tmp}", str(tmp_path)) for a in argv)], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"cannot write to the store at {image_store.root}" in err
        # reading still works, and a write through the Python API fails at the table's lock, in one line
        assert run(["--store", str(image_store.root), "sql", "SELECT count(*) FROM images"], capsys)[0] == 0
        with pytest.raises(UserError, match="cannot write to the store"):
            Store(image_store.root, create=False).upsert("prompts", image_store.read("prompts"))
    assert store_files(image_store) == before


def test_reimporting_a_folder_by_caption_counts_its_files(tmp_path, image_store, capsys):
    """File names repeat across caption folders (0.png in each): a re-run matches them by caption,
    not by name (which took one file for every 0.png and printed negative counts)."""
    folder = tmp_path / "mine"
    for caption, colour in (("a red square", "red"), ("a blue square", "blue")):
        (folder / caption).mkdir(parents=True)
        Image.new("RGB", (32, 32), colour).save(folder / caption / "0.png")
    argv = ["--store", str(image_store.root), "import-images", "--set", "mine", str(folder)]
    assert main(argv) == 0
    assert "registered 2 image files (2 new images; the set has 2)" in capsys.readouterr().out
    assert main(argv) == 0
    assert "registered 2 image files (0 new images; the set has 2)" in capsys.readouterr().out
    files = image_store.connect().execute("SELECT count(DISTINCT sha256) FROM images WHERE set = 'mine'").fetchall()
    assert files == [(2,)]
