import contextlib
import functools
import http.server
import json
import threading

import pytest

from tasks.ingest import ingest_tia2
from cli.main import main
from tia2.store import Store


def _table_files(store_root):
    return {p.name: p.stat().st_mtime_ns for p in store_root.glob("*.parquet")}


def test_real_release_reproduces_table1_and_included_captions(real_store):
    con = real_store.connect()
    shares = dict(con.execute(
        """SELECT set, round(100 * avg(good), 2) FROM (
               SELECT i.set, (sum((l.label = 1)::INT) >= 2)::INT AS good
               FROM images i JOIN labels l USING (image_id) GROUP BY i.set, i.image_id)
           GROUP BY set""").fetchall())
    assert shares == {"comprehensive": 47.22, "counting": 43.27, "composition": 38.97}
    included = dict(con.execute(
        """SELECT set, count(*) FROM (
               SELECT i.set, i.prompt_id, avg(good) AS h FROM (
                   SELECT i.set, i.prompt_id, i.image_id, (sum((l.label = 1)::INT) >= 2)::INT AS good
                   FROM images i JOIN labels l USING (image_id) GROUP BY ALL) i GROUP BY ALL)
           WHERE h > 0 AND h < 1 GROUP BY set""").fetchall())
    assert included == {"comprehensive": 84, "counting": 146, "composition": 295}


def test_contrast_sets_drop_repeats_and_the_caption_itself(real_store, tia2_source):
    con = real_store.connect()
    stored = con.execute("SELECT count(*) FROM contrast_prompts WHERE method = 'dataset'").fetchall()[0][0]
    released = sum(len(v) for s in ("comprehensive", "counting", "composition")
                   for v in json.loads((tia2_source / f"prompts/prompt_set_{s}.json").read_text()).values())
    assert stored == released - 41 - 1
    assert con.execute("""SELECT count(*) FROM contrast_prompts c JOIN prompts p
                          ON p.prompt_id = c.prompt_id AND p.text = c.text""").fetchall()[0][0] == 0


def test_reingest_is_a_noop(tmp_path, mini_release):
    store = Store(tmp_path / "store")
    first = ingest_tia2(store, str(mini_release))
    assert first["new_rows"] == {"prompts": 6, "contrast_prompts": 18, "images": 24, "labels": 72}
    before = _table_files(store.root)
    second = ingest_tia2(store, str(mini_release))
    assert set(second["new_rows"].values()) == {0}
    assert _table_files(store.root) == before  # nothing rewritten


def _corrupt(release, relpath, edit):
    path = release / relpath
    path.write_text(edit(path.read_text()))


def _break_label(text):
    data = json.loads(text)
    first = next(iter(data))
    data[first]["human_labels"] = [1, 2, 0]
    return json.dumps(data)


def _drop_contrast_set(text):
    data = json.loads(text)
    data.pop(next(iter(data)))
    return json.dumps(data)


@pytest.mark.parametrize("relpath, edit, expected", [
    ("human_annotations/human_labels_counting.json", lambda t: t[:-5],
     "human_labels_counting.json: malformed JSON at line 1"),
    ("human_annotations/human_labels_counting.json", _break_label,
     "human_labels_counting.json: entry 'image_1_0_0.jpg': label 2 is not one of 1, 0, -1"),
    ("prompts/prompt_set_composition.json", _drop_contrast_set,
     "has no contrast set in prompts/prompt_set_composition.json"),
])
def test_bad_release_is_one_line_exit_2_nothing_written(tmp_path, mini_release, capsys,
                                                        relpath, edit, expected):
    _corrupt(mini_release, relpath, edit)
    store = tmp_path / "store"
    code = main(["ingest-tia2", str(mini_release), "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert Store(store).read("images").num_rows == 0
    assert Store(store).read("labels").num_rows == 0


def test_missing_file_is_named(tmp_path, mini_release, capsys):
    (mini_release / "prompts/prompt_set_counting.json").unlink()
    assert main(["ingest-tia2", str(mini_release), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "prompt_set_counting.json: missing file" in err and err.count("\n") == 1
    assert Store(tmp_path / "s").read("prompts").num_rows == 0


@contextlib.contextmanager
def serve_folder(folder):
    """A static HTTP server on loopback over `folder`; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_ingest_from_url_equals_ingest_from_folder(tmp_path, mini_release):
    via_url = Store(tmp_path / "a")
    with serve_folder(mini_release) as url:
        ingest_tia2(via_url, url)
    via_folder = Store(tmp_path / "b")
    ingest_tia2(via_folder, str(mini_release))
    for table in ("prompts", "images", "labels"):
        assert via_url.read(table).equals(via_folder.read(table))
    assert (via_url.read("contrast_prompts").drop(["created_at"])
            .equals(via_folder.read("contrast_prompts").drop(["created_at"])))


def test_unreachable_url_says_how_to_provide_the_files(tmp_path, capsys):
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    code = main(["ingest-tia2", "http://127.0.0.1:9/tia2", "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "TIA2_SOURCE" in err and err.count("\n") == 1


def test_url_with_a_missing_file_is_named(tmp_path, mini_release, capsys):
    (mini_release / "human_annotations/human_labels_composition.json").unlink()
    with serve_folder(mini_release) as url:
        code = main(["ingest-tia2", url, "--store", str(tmp_path / "s")])
    assert code == 2 and "HTTP 404" in capsys.readouterr().err
