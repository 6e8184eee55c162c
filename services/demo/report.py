"""What the demo measured, per policy version, and the report people read (markdown, PNG, JSON).

Every version answers the same held-out scenes (scenes no simulated user ever sees) with the same
sampling seeds at temperature 1, so versions differ only by their weights:
- hallucination_rate: share of sampled answers the judge (scenes.faithfulness) flags, with a 95%
  Wilson interval; hallucination_by_kind: the same share per kind of question;
- win_rate_vs_v0: per scene, the users' hidden preference (without their noise) between this
  version's answer and v0's, ties counted half; mean and 95% normal interval over scenes;
- mean_reward: the last published reward model's mean score of the answers (one model for all
  versions, so the numbers compare);
- reward_model_accuracy: how often the reward model published with the version (rN beside vN)
  orders this version's answer and v0's on the same scene as the users' hidden preference does,
  over the scenes where that preference is not a tie; None for v0, which has no reward model yet.
  Set beside the win rate, it says whether what the loop optimised is what users want;
- kl: KL(version || v0) per answer in nats, estimated on the same samples as the mean of
  log pi_version(answer) - log pi_v0(answer) (each answer's tokens scored by v0 under the sampler's
  own masking, at temperature 1); 0 for v0 itself;
- bleu, rouge_l: the answers against the scenes' concise and verbose reference answers;
- pope: POPE's figures (accuracy, precision, recall, F1, yes-ratio) over the held-out "exists" questions
  (is there a COLOUR SHAPE?), whose true answer is yes or no.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from modalign.demo.scenes import STYLES, Example, examples, faithfulness, rate_by_kind, reference_answer
from modalign.demo.speech import spoken_clip
from modalign.demo.users import preference
from modalign.evaluation.metrics import bleu, mean_interval, pope, rouge_l, wilson_interval
from modalign.evaluation.run import Prompt, answers_of, reward_scores
from modalign.policy.engine import PolicyEngine, Sample, mask_unsampleable
from modalign.policy.families import audio_sampling_rate
from modalign.policy.model import format_conversation, load_policy
from modalign.reward.backbones import AnyRewardModel, load_reward_model

HELD_OUT_SEED = 424242


@dataclass
class VersionResult:
    version: str
    promoted: bool
    mean_reward: float
    win_rate_vs_v0: float
    win_rate_ci: list[float]
    hallucination_rate: float
    hallucination_ci: list[float]
    kl: float
    samples: int
    bleu: float = 0.0
    """Corpus BLEU (0-100) of the answers against the scenes' concise and verbose reference answers."""
    rouge_l: float = 0.0
    """Mean ROUGE-L F-measure (0-1) against the same references."""
    pope: dict | None = None
    """POPE's figures over the held-out yes/no questions; None when there were none."""
    hallucination_by_kind: dict[str, float] = field(default_factory=dict)
    """The hallucination rate per kind of question (count, colour, position, describe, exists)."""
    spoken: Judged | None = None
    """The hallucination and win rate of the same questions asked aloud; None when the demo asked none aloud."""
    reward_model_accuracy: float | None = None
    reward_model_pairs: int = 0
    """Scenes whose two answers (this version's, v0's) the users do not rate as a tie."""
    size_bytes: int = 0
    """What the version takes in the model store: every file of its folder (an adapter version's, not its base's)."""
    examples: list[dict] = field(default_factory=list)
    """A few (question, answer, verdict) rows for the markdown."""


def held_out_examples(n: int) -> list[Example]:
    stream = examples(HELD_OUT_SEED)
    return [next(stream) for _ in range(n)]


def held_out_prompts(held_out: list[Example], sampling_rate: int | None = None) -> list[Prompt]:
    """The held-out questions typed, or spoken (speech.spoken_clip) at sampling_rate when one is given."""
    return [Prompt(e.question.text, [e.scene.image()], None if sampling_rate is None else spoken_clip(e.question.text, sampling_rate))
            for e in held_out]


@torch.no_grad()
def kl_to(reference: PolicyEngine, samples: list[Sample], prompts: list[Prompt]) -> float:
    """Mean over samples of log pi(answer) - log pi_reference(answer): an unbiased estimate of
    KL(pi || pi_reference) per answer, pi being the policy that sampled them."""
    differences = []
    for sample, prompt in zip(samples, prompts):
        if not sample.token_ids:
            differences.append(0.0)
            continue
        device = reference.model.device
        family, processor = reference.family, reference.processor
        encoded = family.encode(processor, format_conversation(processor, prompt.conversation), prompt.images, prompt.audio)
        row = family.extend(encoded, list(sample.token_ids))
        logits = reference.model(**family.model_inputs(reference.model, [row], reference.pad_token_id)).logits[0]
        # The logits at position t predict token t + 1: the answer's tokens are predicted by the positions before them.
        predicting = mask_unsampleable(logits[-len(sample.token_ids) - 1:-1].float(), reference.unsampleable_token_ids)
        answer = torch.tensor(sample.token_ids, device=device).unsqueeze(-1)
        reference_logprob = torch.log_softmax(predicting, dim=-1).gather(-1, answer).sum().item()
        differences.append(sum(sample.logprobs) - reference_logprob)
    return sum(differences) / len(differences)


@dataclass
class Judged:
    """One version's answers to the held-out questions as the users' hidden preference judges them."""

    hallucination_rate: float
    hallucination_ci: list[float]
    win_rate_vs_v0: float
    win_rate_ci: list[float]
    samples: int
    hallucination_by_kind: dict[str, float] = field(default_factory=dict)
    """The hallucination rate per kind of question: which kinds RLHF has left to fix."""


def judge(answers: list[str], baseline: list[str], held_out: list[Example]) -> Judged:
    """answers (one per held-out question) judged, and compared with v0's (baseline)."""
    flags = [(e.question.kind, faithfulness(a, e.scene, e.question).hallucinated) for a, e in zip(answers, held_out)]
    hallucinated = sum(flag for _, flag in flags)
    win_rate, win_ci = mean_interval([preference(a, b, e) for a, b, e in zip(answers, baseline, held_out)])
    return Judged(hallucinated / len(answers), wilson_interval(hallucinated, len(answers)), win_rate, win_ci, len(answers),
                  rate_by_kind(flags))


def evaluate_versions(
    versions: list[tuple[str, Path, bool, Path | None]], held_out: list[Example], max_new_tokens: int = 32,
    device: str = "cpu", spoken: bool = False,
) -> list[VersionResult]:
    """versions: (name, model folder, promoted, its reward model's folder or None), v0 first. Mean rewards
    are scored by the last version's reward model. With spoken, every version also answers the same questions
    asked aloud (VersionResult.spoken)."""
    reward_folders = [folder for *_, folder in versions if folder is not None]
    reward = load_reward_model(reward_folders[-1]).to(device) if reward_folders else None
    engines = {name: PolicyEngine(*load_policy(folder, device=device), policy_version=name) for name, folder, *_ in versions}
    reference = versions[0][0]
    typed = held_out_prompts(held_out)
    samples = {name: answers_of(engine, typed, max_new_tokens, HELD_OUT_SEED) for name, engine in engines.items()}
    baseline = [s.text for s in samples[reference]]
    said: dict[str, list[str]] = {}
    if spoken:
        rate = audio_sampling_rate(engines[reference].processor)
        if rate is None:
            raise ValueError(f"{reference} hears nothing: its answers to spoken questions cannot be evaluated")
        aloud = held_out_prompts(held_out, rate)
        said = {name: [s.text for s in answers_of(engine, aloud, max_new_tokens, HELD_OUT_SEED)] for name, engine in engines.items()}
    references = [[reference_answer(e.scene, e.question, style) for style in STYLES] for e in held_out]
    exists = [i for i, e in enumerate(held_out) if e.question.kind == "exists"]
    results = []
    for name, folder, promoted, reward_folder in versions:
        mine = [s.text for s in samples[name]]
        judged = judge(mine, baseline, held_out)
        mean_reward = reward_scores(reward, typed, mine).mean().item() if reward is not None else float("nan")
        accuracy, pairs = (None, 0)
        if reward_folder is not None:
            accuracy, pairs = reward_model_accuracy(load_reward_model(reward_folder).to(device), held_out, typed, mine, baseline)
        results.append(VersionResult(
            version=name, promoted=promoted, mean_reward=mean_reward, win_rate_vs_v0=judged.win_rate_vs_v0,
            win_rate_ci=judged.win_rate_ci, hallucination_rate=judged.hallucination_rate,
            hallucination_ci=judged.hallucination_ci, samples=judged.samples, hallucination_by_kind=judged.hallucination_by_kind,
            kl=0.0 if name == reference else kl_to(engines[reference], samples[name], typed),
            spoken=judge(said[name], said[reference], held_out) if spoken else None,
            reward_model_accuracy=accuracy, reward_model_pairs=pairs,
            size_bytes=sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()),
            bleu=bleu(mine, references)[0], rouge_l=rouge_l(mine, references)[0],
            pope=pope([mine[i] for i in exists], [held_out[i].question.answer_is_yes for i in exists]) if exists else None,
            examples=[{"question": e.question.text, "answer": a, "hallucinated": faithfulness(a, e.scene, e.question).hallucinated}
                      for e, a in list(zip(held_out, mine))[:3]],
        ))
    return results


def reward_model_accuracy(
    reward: AnyRewardModel, held_out: list[Example], prompts: list[Prompt], answers: list[str], baseline: list[str]
) -> tuple[float | None, int]:
    """Share of scenes, among those where the users' hidden preference between answers[i] and
    baseline[i] is not a tie, on which the reward model prefers the same one; and how many there were."""
    mine, theirs = reward_scores(reward, prompts, answers), reward_scores(reward, prompts, baseline)
    agree = [(m > t).item() == (verdict == 1.0)
             for m, t, verdict in zip(mine, theirs, (preference(a, b, e) for a, b, e in zip(answers, baseline, held_out)))
             if verdict != 0.5]
    return (sum(agree) / len(agree) if agree else None), len(agree)


def _accuracy(result: VersionResult) -> str:
    if result.reward_model_accuracy is None:
        return "-"
    return f"{result.reward_model_accuracy:.1%} ({result.reward_model_pairs})"


def _rate(value: float, interval: list[float]) -> str:
    return f"{value:.1%} ({interval[0]:.1%}-{interval[1]:.1%})"


def _pope(result: VersionResult) -> str:
    if result.pope is None:
        return "-"
    figures = result.pope
    return f"{figures['accuracy']:.1%}, {figures['yes_ratio']:.0%} ({figures['questions']})"


def head_to_head(verdicts) -> dict | None:
    """What users said when they compared the canary's answer with stable's in one request, from a
    rollout decision's preference verdict (whose statistic is the canary's wins): None before any.
    The win rate counts ties half, as the win rate against v0 does."""
    preference = next((v for v in verdicts if v.metric == "preference"), None)
    if preference is None or not (preference.canary_samples or preference.ties):
        return None
    decided, canary_wins, ties = preference.canary_samples, round(preference.statistic), preference.ties
    compared, score = decided + ties, canary_wins + ties / 2
    return {"canary_wins": canary_wins, "stable_wins": decided - canary_wins, "ties": ties,
            "canary_win_rate": score / compared, "canary_win_rate_ci": wilson_interval(score, compared)}


def freshness_line(freshness: dict) -> str:
    """report.md's sentence on a Freshness (modalign.demo.freshness) as a dict."""
    if not freshness["measured"]:
        return (f"Freshness: no version trained on the users' feedback served canary traffic before the loop"
                f" ended ({freshness['left_out']} feedback messages).")
    return (f"Freshness: a version trained on a user's feedback served canary traffic a median"
            f" {freshness['median']:.0f} s (p90 {freshness['p90']:.0f} s) after the feedback arrived, over"
            f" {freshness['measured']} feedback messages; {freshness['left_out']} came too late for a version"
            f" that served before the loop ended, and the trainer passed over {freshness['passed_over']} as older"
            " than its --max-feedback-age-s.")


def memory_line(memory: dict[str, dict]) -> str:
    """report.md's sentence on the processes' resident memory (modalign.demo.memory's ResidentMemory as dicts)."""
    figures = ", ".join(f"{name} {m['idle']:.0f} / {m['load_median']:.0f} / {m['load_max']:.0f}"
                        for name, m in memory.items())
    return f"Resident memory in MiB (idle / median under load / max under load): {figures}."


def write_report(out: Path, results: list[VersionResult], timeline: list[dict], summary: dict) -> None:
    """report.json, report.md and the PNG plots it shows, in out/."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    report = {**summary, "versions": [asdict(r) for r in results], "timeline": timeline}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    spoken = results[0].spoken is not None
    spoken_header = " spoken: hallucination rate (95% CI) | spoken: win rate vs v0 (95% CI) |" if spoken else ""
    names = [r.version for r in results]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    # Typed questions' bars (blue if promoted, grey if not), and with spoken questions a hatched bar beside each.
    groups = [("typed", [(r.hallucination_rate, r.hallucination_ci, r.win_rate_vs_v0, r.win_rate_ci) for r in results])]
    if spoken:
        groups.append(("spoken", [(r.spoken.hallucination_rate, r.spoken.hallucination_ci, r.spoken.win_rate_vs_v0,
                                   r.spoken.win_rate_ci) for r in results if r.spoken is not None]))
    width = 0.8 / len(groups)
    for index, (label, figures) in enumerate(groups):
        where = [i + (index - (len(groups) - 1) / 2) * width for i in range(len(results))]
        for axis, value, interval in ((axes[0], 0, 1), (axes[1], 2, 3)):
            values = [f[value] for f in figures]
            errors = [[v - f[interval][0] for v, f in zip(values, figures)], [f[interval][1] - v for v, f in zip(values, figures)]]
            axis.bar(where, values, width=width, yerr=errors, capsize=3, label=label, hatch="//" if label == "spoken" else None,
                     color=["#4878d0" if r.promoted else "#b0b0b0" for r in results], edgecolor="white")
    for axis, title in ((axes[0], "hallucination rate (sampled)"), (axes[1], "win rate vs v0 (hidden preference)")):
        axis.set_xticks(range(len(results)), names)
        axis.set_title(title)
        axis.set_ylim(0, 1)
        if spoken:
            axis.legend(fontsize="small")
    axes[1].axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    axes[2].plot(names, [r.mean_reward for r in results], marker="o")
    axes[2].set_title("mean reward (last reward model)")
    figure.tight_layout()
    figure.savefig(out / "versions.png", dpi=110)
    plt.close(figure)

    lines = [
        "# modalign demo report", "",
        f"Online RLHF loop from v0 to the final version: {summary['seconds']:.0f} s"
        f" (warm start {summary['warm_start_seconds']:.0f} s, 0 when cached). Final version serving all traffic:"
        f" **{summary['final']}**.", "",
        f"Traffic: {summary['requests']} requests, {summary['conversations']} of them follow-ups in a two-turn"
        f" conversation and {summary['http_requests']} over the OpenAI-compatible HTTP API (the rest over gRPC)"
        + (f", {summary['spoken_requests']} asked aloud (spoken by {summary['synthesiser']})" if summary.get("spoken_requests") else "")
        + f"; {summary['feedback']} feedback messages.", "",
        freshness_line(summary["freshness_seconds"]), "",
        memory_line(summary["memory_mib"]), "",
        "![per version](versions.png)", "",
        "| version | promoted | hallucination rate (95% CI) | win rate vs v0 (95% CI) | mean reward"
        " | reward model accuracy (pairs) | KL to v0 (nats per answer) | BLEU | ROUGE-L | POPE accuracy, yes-ratio"
        f" | size (MB) |{spoken_header}",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * (2 if spoken else 0),
    ]
    for r in results:
        lines.append(
            f"| {r.version} | {'yes' if r.promoted else 'no'} | {_rate(r.hallucination_rate, r.hallucination_ci)}"
            f" | {_rate(r.win_rate_vs_v0, r.win_rate_ci)} | {r.mean_reward:.3f}"
            f" | {_accuracy(r)} | {r.kl:.3f} | {r.bleu:.1f} | {r.rouge_l:.3f} | {_pope(r)}"
            f" | {r.size_bytes / 1e6:.1f} |"
            + (f" {_rate(r.spoken.hallucination_rate, r.spoken.hallucination_ci)}"
               f" | {_rate(r.spoken.win_rate_vs_v0, r.spoken.win_rate_ci)} |" if r.spoken is not None else ""))
    lines += [
        "", "## How these were measured", "",
        f"Each version answered the same {results[0].samples} held-out scenes (never shown to the simulated users),"
        " one answer each, sampled at temperature 1 with the same seeds. The judge (services/demo/scenes.py)"
        " flags an answer as hallucinated when it asserts a colour, shape, size, position or count that is not"
        " in the image. The win rate compares each answer with v0's on the same scene by the users' hidden"
        " preference (faithful first, then concise; ties count half), without the noise users add to their"
        " feedback. Intervals are 95%: Wilson for the hallucination rate, normal over scenes for the win rate."
        " The reward model accuracy is that of the reward model published with the version: on the scenes where"
        " the users' hidden preference between the version's answer and v0's is not a tie, how often the reward"
        " model prefers the same answer (a reward model that tracks the users keeps it high while the win rate"
        " rises; one being gamed does not). POPE is over the held-out questions that ask whether an object is"
        " there (half of them about one that is not): accuracy, and how often the version said yes; a version"
        " that hallucinates objects says yes too often."
        + (" The spoken columns are the same questions asked aloud (the clip the users send, no text), judged the"
           " same way against v0's spoken answers." if spoken else ""),
        "", "## Canary decisions", "",
    ]
    for entry in timeline:
        compared = entry.get("head_to_head")
        users = "" if compared is None else (
            f" Head to head, the canary won {compared['canary_wins']}, lost {compared['stable_wins']} and tied"
            f" {compared['ties']} comparisons with stable (win rate {compared['canary_win_rate']:.0%} with ties half,"
            f" 95% CI {compared['canary_win_rate_ci'][0]:.0%}-{compared['canary_win_rate_ci'][1]:.0%}).")
        lines.append(f"- {entry['time']} revision {entry['revision']}: {entry['reason']}{users}")
    lines += ["", "## Sample answers", ""]
    for r in results:
        for row in r.examples:
            flag = " (hallucinated)" if row["hallucinated"] else ""
            lines.append(f"- {r.version}: *{row['question']}* → {row['answer']!r}{flag}")
    (out / "report.md").write_text("\n".join(lines) + "\n")
