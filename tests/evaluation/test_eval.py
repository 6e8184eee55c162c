"""`modalign eval` end to end on tiny models: the built-in set, JSONL and Parquet sets, store versions and
their reward model, and bad sets refused by name."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from modalign import cli
from modalign.core.modelstore import Manifest, open_store
from modalign.evaluation.run import EvalItem, compare
from modalign.policy.model import build_default_policy, save_policy
from modalign.reward.backbones import build_default_reward_model

QUICK = ["--max-new-tokens", "4", "--device", "cpu"]


def run_eval(*args: str) -> int:
    with pytest.raises(SystemExit) as exited:
        cli.main(["eval", *QUICK, *args])
    return int(exited.value.code or 0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder model store holding policies v1 and v2 (v2 another initialisation) and v1's reward model r1."""
    root = tmp_path_factory.mktemp("store")
    models = open_store(str(root))
    for version, seed in (("v1", 0), ("v2", 1)):
        model, processor = build_default_policy(seed=seed)
        models.publish(Manifest(version=version, kind="policy", parent="v0"),
                       lambda folder, m=model, p=processor: save_policy(m, p, folder))
    models.publish(Manifest(version="r1", kind="reward", parent="v0"), build_default_reward_model(seed=3).save)
    return root


def test_a_store_version_is_scored_on_the_built_in_set_by_its_own_reward_model(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert run_eval("--version", "v1", "--against", "v1", "--model-store", str(store), "--builtin-items", "8",
                    "--out", str(out)) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["version"] == "v1" and result["items"] == 8
    assert result["bleu"]["items"] == 4 and 0 <= result["bleu"]["score"] <= 100
    assert 0 <= result["rouge_l"]["score"] <= 1 and 0 <= result["exact_match"]["score"] <= 1
    assert set(result["pope"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert result["pope"]["questions"] == 4
    assert result["reward"]["model"] == "r1"
    # Greedy answers against themselves: every comparison a tie.
    assert result["win_rate"] == {"against": "v1", "model": "r1", "rate": 0.5, "ci": [0.5, 0.5]}
    assert "| BLEU (4 items) |" in (out / "eval.md").read_text()


def test_against_another_version_every_figure_is_a_paired_difference(store: Path, tmp_path: Path) -> None:
    """v2 (another initialisation) against v1 from the store: each difference is v2's figure minus v1's own
    evaluation's (sampled, as two random initialisations answer alike greedily). Then v1 against itself given
    as a folder: every difference is zero and nothing is worse."""
    results = {}
    for version, against in (("v1", ()), ("v2", ("--against", "v1"))):
        out = tmp_path / version
        assert run_eval("--version", version, *against, "--reward-version", "r1", "--model-store", str(store),
                        "--builtin-items", "8", "--temperature", "1", "--out", str(out)) == 0
        results[version] = json.loads((out / "eval.json").read_text())
    differences = results["v2"]["compared"]["differences"]
    assert set(differences) == {"bleu", "rouge_l", "exact_match", "pope_accuracy", "pope_precision", "pope_recall",
                                "pope_f1", "reward"}
    mean_reward = {version: result["reward"]["mean"] for version, result in results.items()}
    assert mean_reward["v2"] != mean_reward["v1"]
    assert differences["reward"]["difference"] == pytest.approx(mean_reward["v2"] - mean_reward["v1"])
    for name in ("bleu", "rouge_l", "exact_match"):
        assert differences[name]["difference"] == pytest.approx(results["v2"][name]["score"] - results["v1"][name]["score"])
    assert "## Against v1" in (tmp_path / "v2" / "eval.md").read_text()

    folder = open_store(str(store)).fetch("policy", "v1")
    out = tmp_path / "v1"
    assert run_eval("--version", "v1", "--against-model-dir", str(folder), "--model-store", str(store),
                    "--builtin-items", "8", "--out", str(out)) == 0
    compared = json.loads((out / "eval.json").read_text())["compared"]
    assert compared["against"] == folder.name
    for figure in compared["differences"].values():
        assert figure == {"difference": 0, "ci": [0, 0], "worse": False}


def test_a_missing_folder_to_compare_with_is_refused_by_its_flag(store: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert run_eval("--version", "v1", "--against-model-dir", str(tmp_path / "nothing"), "--model-store", str(store),
                    "--builtin-items", "2") == 2
    assert "--against-model-dir" in capsys.readouterr().err


def test_compare_calls_worse_only_what_is_worse_on_the_whole_interval() -> None:
    items = [EvalItem(f"What colour is shape {i}?", [], (f"Red {i}.",)) for i in range(20)]
    items += [EvalItem(f"Is there a shape {i}?", [], (), label=i % 2 == 0) for i in range(20)]
    right = [f"Red {i}." for i in range(20)] + ["Yes." if i % 2 == 0 else "No." for i in range(20)]
    wrong = [f"Blue {i}." for i in range(20)] + ["No." if i % 2 == 0 else "Yes." for i in range(20)]
    better = compare(right, wrong, items, rewards=([1.0] * 40, [0.0] * 40))
    worse = compare(wrong, right, items, rewards=([0.0] * 40, [1.0] * 40))
    assert better.keys() == worse.keys() == {"bleu", "rouge_l", "exact_match", "pope_accuracy", "pope_precision",
                                             "pope_recall", "pope_f1", "reward"}
    for name in better:
        assert better[name]["difference"] > 0 and not better[name]["worse"], name
        assert worse[name]["difference"] == pytest.approx(-better[name]["difference"]) and worse[name]["worse"], name
    assert better["exact_match"]["difference"] == 1.0 and better["pope_accuracy"]["difference"] == 1.0


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


ITEMS = [
    {"question": "What colour is it?", "images": ["red.png"], "references": ["Red.", "It is red."]},
    {"question": "Is there a red square?", "images": ["data:image/png;base64," + base64.b64encode(png("red")).decode()],
     "label": "yes"},
]


def test_jsonl_and_parquet_sets_give_the_same_result(tmp_path: Path) -> None:
    (tmp_path / "red.png").write_bytes(png("red"))
    model = tmp_path / "model"
    save_policy(*build_default_policy(seed=0), model)
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text("\n".join(json.dumps(item) for item in ITEMS) + "\n")
    parquet = tmp_path / "set.parquet"
    pq.write_table(pa.Table.from_pylist([{"label": None, "references": [], **item} for item in ITEMS]), parquet)
    results = []
    for dataset in (jsonl, parquet):
        out = tmp_path / dataset.suffix[1:]
        assert run_eval("--model-dir", str(model), "--dataset", str(dataset), "--out", str(out)) == 0
        results.append(json.loads((out / "eval.json").read_text()))
    for result in results:
        assert result["items"] == 2 and result["bleu"]["items"] == 1 and result["pope"]["questions"] == 1
        assert "reward" not in result  # a folder has no reward model published with it
    assert [r["examples"] for r in results][0] == [r["examples"] for r in results][1]


@pytest.mark.parametrize(("line", "named"), [
    ('{"question": "Q?", "images": ["red.png"], "label": "maybe"}', "item 2: label"),
    ('{"question": "", "images": ["red.png"], "references": ["A."]}', "item 2: question"),
    ('{"question": "Q?", "images": ["missing.png"], "references": ["A."]}', "item 2: images[0]: not a readable image"),
    ('{"question": "Q?", "images": ["red.png"]}', "item 2: references or label"),
    ("not json", "line 2: not JSON"),
])
def test_a_bad_set_is_refused_naming_the_item_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         line: str, named: str) -> None:
    (tmp_path / "red.png").write_bytes(png("red"))
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text(json.dumps(ITEMS[0]) + "\n" + line + "\n")
    assert run_eval("--model-dir", str(tmp_path / "unused"), "--dataset", str(dataset)) == 2
    assert named in capsys.readouterr().err
