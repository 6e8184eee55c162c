"""Benchmark: a LoRA adapter version against a full version, published, brought to serving, and held.

Two sides, on one model in one run:

  full     a version that is a whole checkpoint: published into the model store (every file, then the
           manifest), fetched and verified, loaded into a new engine, first request answered.
  adapter  a version that is a LoRA adapter on that model as its base (already published and served):
           published (adapter/ only), fetched and verified with its base, added to the serving engine
           (PolicyEngine.add_adapter), first request answered.

Reported: the size of each version in the store, publish-to-serving time (median of the repeats, which
alternate the order of the sides), and the ratios full / adapter. Then resident memory: a fresh process
per side serves stable and canary, as two full versions (two models) or as two adapters on one base,
answers one request on each, and reports its resident set (VmRSS); the ratio is of what the models add
to a process that has imported everything and built nothing (also measured).

The model is the built-in LLaVA's vision tower and processor with a larger Llama text model
(--hidden, --layers), randomly initialised: sizes and times scale with the text model, which is what
LoRA adapts. Run from the repository root:

    .venv/bin/python benchmarks/adapter_versions.py --hidden 1024 --layers 8 --rank 16 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlavaForConditionalGeneration

from modalign.core.modelstore import DirectoryStore, Manifest
from modalign.policy.adapters import ADAPTER_FOLDER
from modalign.policy.engine import GenerationRequest, PolicyEngine, SamplingParams
from modalign.policy.model import build_default_policy, format_prompt, load_policy, save_policy
from modalign.trainer.lora import default_target_modules


def build_model(hidden: int, layers: int) -> tuple[LlavaForConditionalGeneration, object]:
    small, processor = build_default_policy(0)
    config = copy.deepcopy(small.config)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, hidden * 11 // 4, layers
    text.num_attention_heads = text.num_key_value_heads = max(hidden // 64, 1)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), processor


def first_answer(engine: PolicyEngine, processor, version: str = "") -> list[int]:
    request = GenerationRequest(format_prompt(processor, "What colour is the square?", 0), [],
                                SamplingParams(temperature=0.0, max_new_tokens=8, seed=0), version=version)
    return engine.generate([request])[0][0].token_ids


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def serve_two(store_root: Path, side: str) -> None:
    """Child process: serve v-stable and v-canary as two full versions or two adapters; print RSS."""
    import modalign.policy.server  # noqa: F401 - everything a replica imports, before the baseline
    store = DirectoryStore(store_root)
    baseline = rss_mib()
    if side == "full":
        engines = [PolicyEngine(*load_policy(store.fetch("policy", v)), policy_version=v) for v in ("full-1", "full-2")]
        for engine in engines:
            first_answer(engine, engine.processor)
    else:
        engine = PolicyEngine(*load_policy(store.fetch("policy", "base")), policy_version="base")
        for version in ("adapter-1", "adapter-2"):
            engine.add_adapter(version, store.fetch("policy", version))
            first_answer(engine, engine.processor, version)
    print(json.dumps({"baseline_mib": baseline, "rss_mib": rss_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the text model")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the text model")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapter versions")
    parser.add_argument("--repeats", type=int, default=3, help="timed publish-to-serving passes per side")
    parser.add_argument("--serve-two", nargs=2, metavar=("STORE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_two:
        serve_two(Path(args.serve_two[0]), args.serve_two[1])
        return
    torch.set_num_threads(1)
    model, processor = build_model(args.hidden, args.layers)
    parameters = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(prefix="modalign-bench-") as scratch:
        store = DirectoryStore(Path(scratch) / "store")
        published = store.publish(Manifest(version="base", kind="policy"), lambda f: save_policy(model, processor, f))
        base = {"version": "base", "manifest_sha256": published.manifest_sha256}
        serving = PolicyEngine(*load_policy(store.fetch("policy", "base")), policy_version="base")
        first_answer(serving, processor)

        def adapter(seed: int):
            torch.manual_seed(seed)
            return get_peft_model(copy.deepcopy(model), LoraConfig(
                r=args.rank, lora_alpha=2 * args.rank, target_modules=default_target_modules(model),
                init_lora_weights=False))

        def full_version(name: str, weights) -> float:
            started = time.perf_counter()
            store.publish(Manifest(version=name, kind="policy"), lambda f: save_policy(weights, processor, f))
            engine = PolicyEngine(*load_policy(store.fetch("policy", name)), policy_version=name)
            first_answer(engine, processor)
            return time.perf_counter() - started

        def adapter_version(name: str, peft) -> float:
            started = time.perf_counter()
            store.publish(Manifest(version=name, kind="policy", base=base),
                          lambda f: peft.save_pretrained(f / ADAPTER_FOLDER))
            serving.add_adapter(name, store.fetch("policy", name))
            first_answer(serving, processor, name)
            return time.perf_counter() - started

        times: dict[str, list[float]] = {"full": [], "adapter": []}
        for repeat in range(args.repeats + 1):  # the first pass warms up, untimed
            peft = adapter(repeat)
            merged = copy.deepcopy(peft).merge_and_unload()  # the same version, as a full checkpoint
            sides = [("full", lambda repeat=repeat, merged=merged: full_version(f"full-{repeat}", merged)),
                     ("adapter", lambda repeat=repeat, peft=peft: adapter_version(f"adapter-{repeat}", peft))]
            for side, run in (sides if repeat % 2 == 0 else sides[::-1]):
                elapsed = run()
                if repeat:
                    times[side].append(elapsed)
        sizes = {side: folder_bytes(store.root / "policy" / f"{side}-1") for side in times}
        full_s, adapter_s = (statistics.median(times[side]) for side in ("full", "adapter"))
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{parameters / 1e6:.1f}M parameters (text model {args.hidden} x {args.layers} layers), "
              f"LoRA rank {args.rank}")
        print("| version | size in the store | publish to serving (median, range) |")
        print("| --- | --- | --- |")
        for side in ("full", "adapter"):
            print(f"| {side} | {sizes[side] / 1e6:.2f} MB | {statistics.median(times[side]):.3f} s "
                  f"({min(times[side]):.3f}-{max(times[side]):.3f}) |")
        print(f"full / adapter: size {sizes['full'] / sizes['adapter']:.1f}x, publish to serving {full_s / adapter_s:.1f}x")

        memory = {}
        for side in ("full", "adapters"):
            out = subprocess.run([sys.executable, __file__, "--serve-two", str(store.root), side],
                                 check=True, capture_output=True, text=True).stdout
            memory[side] = json.loads(out.strip().splitlines()[-1])
        print("| stable + canary as | resident memory | over the bare process |")
        print("| --- | --- | --- |")
        for side, label in (("full", "two full versions"), ("adapters", "two adapters on one base")):
            m = memory[side]
            print(f"| {label} | {m['rss_mib']:.0f} MiB | {m['rss_mib'] - m['baseline_mib']:.0f} MiB |")
        added = {side: memory[side]["rss_mib"] - memory[side]["baseline_mib"] for side in memory}
        print(f"two full / adapters: {added['full'] / added['adapters']:.2f}x of the memory the models add")
        shutil.rmtree(store.root, ignore_errors=True)


if __name__ == "__main__":
    main()
