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
