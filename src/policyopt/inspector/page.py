"""``policyopt inspect RUN_DIR [--step N]``: one recorded GRPO step as a single self-contained HTML file.

Drawn only from what the run wrote (``inspect/steps.jsonl``, ``metrics.jsonl``): the group (prompt,
answers, each reward function's score, the group's mean and std, the advantages), per-token colour
maps (importance ratio and its clipping, KL to the reference, entropy), the next-token distributions
under pi_old, pi_theta after the update and pi_ref at a few positions, the clipped surrogate against
the ratio with the step's tokens on it, and the run's curves over the steps. Figures are inline SVG
from matplotlib; the one script is inline and optional (clicking a token scrolls to its table).
Nothing is fetched: the page opens from a file, offline.
"""

from __future__ import annotations

import html
import io
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, to_hex  # noqa: E402

from .record import RECORDS_FILE, read_records  # noqa: E402

RATIO_COLOURS = matplotlib.colormaps["RdBu"]  # red: the update made the token less likely, blue: more
KL_COLOURS = LinearSegmentedColormap.from_list("kl", ["#ffffff", "#d95f02"])
ENTROPY_COLOURS = LinearSegmentedColormap.from_list("entropy", ["#ffffff", "#1b9e77"])


class InspectError(ValueError):
    """A run directory, record file or step that ``policyopt inspect`` cannot show (one line, naming it)."""


# ------------------------------------------------------------------ reading the run


def load_step(run_dir: str | Path, step: int | None = None) -> tuple[list[dict], list[int], list[dict]]:
    """(the records of ``step``, default the last recorded one; every recorded step; metrics.jsonl's records)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InspectError(f"{run_dir}: no such run directory")
    path = run_dir / RECORDS_FILE
    records = read_records(path) if path.is_file() else []
    if not records:
        raise InspectError(_why_no_records(run_dir, path))
    steps = sorted({r["step"] for r in records})
    step = steps[-1] if step is None else step
    chosen = [r for r in records if r["step"] == step]
    if not chosen:
        raise InspectError(f"{path}: step {step} was not recorded; recorded steps: {_step_list(steps)}")
    metrics_path = run_dir / "metrics.jsonl"
    metrics = read_records(metrics_path) if metrics_path.is_file() else []
    return chosen, steps, metrics


def _why_no_records(run_dir: Path, path: Path) -> str:
    config = run_dir / "config.yaml"
    nested = sorted(str(p.parent.parent) for p in run_dir.glob(f"*/{RECORDS_FILE}"))
    if nested:
        return f"{run_dir} holds no recorded GRPO steps itself; these runs inside it do: {', '.join(nested)}"
    if not config.is_file():
        return f"{run_dir}: not a policyopt run directory (no config.yaml, no {RECORDS_FILE})"
    text = config.read_text()
    if not re.search(r"^advantage_estimator:", text, re.M):
        kind = "a PPO run" if re.search(r"^value_model:", text, re.M) else "not a GRPO run"
        return f"{run_dir} is {kind} (its config.yaml has no advantage_estimator); policyopt inspect reads GRPO runs"
    return (f"{path}: no recorded steps in this GRPO run (it ran with inspect.groups=0, stopped before its "
            f"first step, or predates step recording); rerun with inspect.groups=1")


def _step_list(steps: list[int]) -> str:
    shown = ", ".join(map(str, steps)) if len(steps) <= 12 else \
        ", ".join(map(str, steps[:6])) + ", ..., " + ", ".join(map(str, steps[-3:]))
    return f"{shown} ({len(steps)} steps)"


def write_page(run_dir: str | Path, step: int | None = None, output: str | Path | None = None) -> Path:
    """Write the page for ``step`` (default: the last recorded) to ``output`` (default
    RUN_DIR/inspect/step-N.html); returns its path."""
    records, steps, metrics = load_step(run_dir, step)
    out = Path(output) if output else Path(run_dir) / RECORDS_FILE.parent / f"step-{records[0]['step']}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(Path(run_dir), records, steps, metrics), encoding="utf-8")
    return out


# ------------------------------------------------------------------ formatting


def _num(value, digits: int = 3) -> str:
    """A recorded number as the page prints it; a missing one (None) as a dash, never as 0."""
    if value is None:
        return "&mdash;"
    return f"{value:.{digits}f}"


def _piece(text: str) -> str:
    """A token's text made visible: spaces, newlines and tabs shown, an empty piece marked."""
    if text == "":
        return "&empty;"
    return html.escape(text).replace(" ", "&middot;").replace("\n", "&#9166;").replace("\t", "&rarr;")


def _css_colour(cmap, x: float) -> tuple[str, str]:
    """(background, a readable text colour) for x in [0, 1]."""
    r, g, b, _ = cmap(min(max(x, 0.0), 1.0))
    return to_hex((r, g, b)), "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#fff"


def _svg(fig) -> str:
    """A matplotlib figure as inline SVG: text as <text> (the browser's own sans-serif), no XML prolog or
    namespace URLs (HTML's parser supplies the SVG namespace), no metadata."""
    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight",
                    metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    plt.close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    return re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg, count=2).replace('<svg ', '<svg class="figure" ', 1)


# ------------------------------------------------------------------ the page


def render_page(run_dir: Path, records: list[dict], steps: list[int], metrics: list[dict]) -> str:
    step, settings = records[0]["step"], records[0]["settings"]
    parts = [_header(run_dir, step, steps, settings)]
    for record in records:
        parts += [_group_section(record), _token_maps(record), _distributions(record), _surrogate(record)]
    parts.append(_curves(metrics, step, settings))
    parts.append(_notes(settings))
    return PAGE.format(title=html.escape(f"{run_dir} step {step}"), style=STYLE, body="\n".join(parts), script=SCRIPT)


def _header(run_dir: Path, step: int, steps: list[int], s: dict) -> str:
    clip = f"[1 &minus; {s['clip_ratio_low']:g}, 1 + {s['clip_ratio_high']:g}]"
    return f"""<h1>GRPO step {step} of {s['steps']} <span class="dim">{html.escape(str(run_dir))}</span></h1>
<p class="settings">policy_loss <b>{s['policy_loss']}</b>, clip range {clip}, &beta; = {s['beta']:g}
{f"(KL estimator {s['kl_estimator']})" if s['beta'] > 0 else "(no reference model)"}, G = {s['group_size']},
temperature {s['temperature']:g}, advantage_estimator {s['advantage_estimator']}
(scale_rewards={str(s['scale_rewards']).lower()}), {s['update_epochs']} pass(es) &times; {s['num_minibatches']}
minibatch(es) per rollout, loss_aggregation {s['loss_aggregation']}.</p>
<p class="dim">Recorded steps: {_step_list(steps)}; another one: <code>policyopt inspect {html.escape(str(run_dir))}
--step N</code>.</p>"""


def _group_section(r: dict) -> str:
    names = r["reward_names"]
    head = "".join(f"<th>{html.escape(n)}<br><span class='dim'>"
                   f"{'weight ' + format(w, 'g') if w is not None else 'added'}</span></th>"
                   for n, w in zip(names, r["reward_weights"]))
    rows = []
    for i, a in enumerate(r["answers"]):
        cells = "".join(f"<td class='num'>{_num(v)}</td>" for v in a["rewards"])
        adv = a["advantage"]
        bg, fg = _css_colour(RATIO_COLOURS, 0.5 + 0.25 * max(-2.0, min(2.0, adv or 0.0)))
        rows.append(f"<tr><td class='num'>{i}</td><td class='answer'>{html.escape(a['text'])}</td>{cells}"
                    f"<td class='num'><b>{_num(a['reward'])}</b></td>"
                    f"<td class='num' style='background:{bg};color:{fg}'>{_num(adv)}</td>"
                    f"<td>{'EOS' if a['finished'] else 'cut'}</td><td class='num'>{a['length']}</td></tr>")
    zero = all((a["advantage"] or 0.0) == 0.0 for a in r["answers"])
    note = (" All advantages are 0 (the rewards are equal): this group gives the surrogate no gradient."
            if zero else "")
    s = r["settings"]
    formula = ("A<sub>i</sub> = (r<sub>i</sub> &minus; mean) / (std + &epsilon;)" if s["advantage_estimator"] == "grpo"
               and s["scale_rewards"] else f"the {s['advantage_estimator']} estimator's A<sub>i</sub>")
    where = f"group {r['group']} of the {r['groups_in_batch']} trained this step"
    return f"""<h2>The group <span class="dim">({where})</span></h2>
<p>Prompt:</p><pre class="prompt">{html.escape(r['prompt'])}</pre>
<table class="group"><tr><th>#</th><th>answer (decoded, as the rewards read it)</th>{head}<th>reward</th>
<th>advantage</th><th>ended</th><th>tokens</th></tr>
{''.join(rows)}</table>
<p>Group mean reward <b>{_num(r['reward_mean'])}</b>, std <b>{_num(r['reward_std'])}</b> (unbiased, over the
answers scored); the advantages are the run's own, {formula}.{note}</p>"""


def _token_maps(r: dict) -> str:
    s = r["settings"]
    token_level = s["policy_loss"] in ("ppo_clip", "cispo")
    # the colour scale: the group's largest |log r|, capped at the clip range (beyond it a token is clipped,
    # outlined); one step at a small learning rate moves r by far less than the clip range
    largest = max([abs(x) for a in r["answers"] for x in a["log_ratio"] if x is not None] + [1e-9])
    clip_bound = max(math.log1p(s["clip_ratio_high"]), -math.log(max(1e-12, 1 - s["clip_ratio_low"])))
    bound = min(largest, clip_bound) if token_level else largest  # GSPO's clip range is the sequence ratio's
    has_kl = "kl" in r["answers"][0] if r["answers"] else False
    kl_max = max([x for a in r["answers"] for x in a.get("kl", []) if x is not None] + [1e-12])
    h_max = max([x for a in r["answers"] for x in a["entropy"] if x is not None] + [1e-12])
    positions = {(p["answer"], p["t"]) for p in r["positions"]}

    def chips(kind: str) -> str:
        lines = []
        for i, a in enumerate(r["answers"]):
            out = []
            for t, piece in enumerate(a["pieces"]):
                lr, kl, h = a["log_ratio"][t], a["kl"][t] if has_kl else None, a["entropy"][t]
                clipped = t in a["clipped"]
                if kind == "ratio":
                    bg, fg = _css_colour(RATIO_COLOURS, 0.5 + 0.5 * (lr or 0.0) / bound)
                elif kind == "kl":
                    bg, fg = _css_colour(KL_COLOURS, (kl or 0.0) / kl_max)
                else:
                    bg, fg = _css_colour(ENTROPY_COLOURS, (h or 0.0) / h_max)
                tip = (f"answer {i}, token {t}: {piece!r} (id {a['ids'][t]})\nlog pi_old = {_plain(a['logp_old'][t])}"
                       f"\nr = pi_theta/pi_old = {_plain(_exp(lr), 4)}{' (clipped)' if clipped else ''}"
                       f"\nentropy = {_plain(h)}" + (f"\nKL term = {_plain(kl, 5)}" if has_kl else ""))
                classes = "tok" + (" clipped" if kind == "ratio" and clipped else "") + \
                    (" has-dist" if (i, t) in positions else "")
                out.append(f"<span class='{classes}' data-pos='{i}-{t}' style='background:{bg};color:{fg}' "
                           f"title='{html.escape(tip, quote=True)}'>{_piece(piece)}</span>")
            more = a["length"] - len(a["pieces"])
            out.append(f"<span class='dim'> &hellip; {more} more tokens not recorded</span>" if more > 0 else "")
            lines.append(f"<div class='tokrow'><span class='rowlabel'>{i} <span class='dim'>A={_num(a['advantage'], 2)}"
                         f"</span></span>{''.join(out)}</div>")
        return "\n".join(lines)

    ratio_scale = (f"colour scale: the group's largest move, r from {math.exp(-bound):.4g} (red) to "
                   f"{math.exp(bound):.4g} (blue)" + (", capped at the clip range" if bound < largest else ""))
    kl_block = (f"<h3>KL term to the reference <span class='dim'>({s['kl_estimator']}(&pi;<sub>old</sub>, "
                f"&pi;<sub>ref</sub>) per token, when the update began; white 0 to orange {kl_max:.3g})</span></h3>"
                + chips("kl")) if has_kl else (
        "<h3>KL term to the reference</h3><p class='absent'>Absent: &beta; = 0, so this run loads no reference "
        "model and has no KL term (nothing was computed; this is not a KL of 0).</p>")
    return f"""<h2>Per token</h2>
<p class="dim">Hover a token for its numbers; underlined tokens have their next-token distributions below
(click one).</p>
<h3>Importance ratio r = &pi;<sub>&theta;</sub>/&pi;<sub>old</sub> after the step's update
<span class="dim">({ratio_scale}; outlined: clipped by the run's {s['policy_loss']} rule)</span></h3>
{_legend(RATIO_COLOURS, f"{math.exp(-bound):.4g}", "1", f"{math.exp(bound):.4g}")}
{chips("ratio")}
{kl_block}
<h3>Entropy of &pi;<sub>old</sub> <span class="dim">(nats, at the sampling temperature; white 0 to green
{h_max:.3g})</span></h3>
{chips("entropy")}"""


def _plain(value, digits: int = 4) -> str:
    return "missing" if value is None else f"{value:.{digits}g}"


def _exp(value):
    return None if value is None else math.exp(value)


def _legend(cmap, left: str, middle: str, right: str) -> str:
    stops = ", ".join(to_hex(cmap(x)) for x in (0.0, 0.25, 0.5, 0.75, 1.0))
    return (f"<div class='legend'><span>{left}</span><span class='bar' style='background:linear-gradient(to right, "
            f"{stops})'></span><span>{right}</span><span class='dim'>(middle: {middle})</span></div>")


def _distributions(r: dict) -> str:
    has_ref = r["settings"]["beta"] > 0
    blocks = []
    for p in r["positions"]:
        a = r["answers"][p["answer"]]
        lr = a["log_ratio"][p["t"]]
        rows = []
        for e in p["tokens"]:
            cells = []
            for k in range(3 if has_ref else 2):
                value, floor = e["p"][k], p["floor"][k]
                if value is None:
                    cells.append(f"<td class='num dim'>&lt; {floor:.3f}</td>" if floor is not None else "<td></td>")
                else:
                    cells.append(f"<td class='num'><span class='pbar' style='width:{100 * value:.0f}px'></span>"
                                 f"{value:.3f}</td>")
            if not has_ref:
                cells.append("<td class='dim'>no &pi;<sub>ref</sub></td>")
            mark = " class='sampled'" if e["sampled"] else ""
            rows.append(f"<tr{mark}><td class='tokcell'>{_piece(e['piece'])}</td>{''.join(cells)}</tr>")
        context = "".join(_piece(x) for x in a["pieces"][:p["t"]])
        blocks.append(f"""<div class="dist" id="pos-{p['answer']}-{p['t']}">
<h3>answer {p['answer']}, token {p['t']} <span class="dim">(A = {_num(a['advantage'])}, r = {_plain(_exp(lr), 4)},
|A &middot; log r| = {_plain(p['score'], 3)})</span></h3>
<p class="context"><span class="dim">after</span> {html.escape(r['prompt'][-40:])}<b>{context}</b></p>
<table><tr><th>next token</th><th>&pi;<sub>old</sub></th><th>&pi;<sub>&theta;</sub> after update</th>
<th>&pi;<sub>ref</sub></th></tr>{''.join(rows)}</table></div>""")
    ref_note = "" if has_ref else " &beta; = 0: there is no reference model, so no &pi;<sub>ref</sub> column."
    return f"""<h2>Next-token distributions</h2>
<p class="dim">At the {len(r['positions'])} answer tokens where |A &middot; log r| is largest (the update moved most in
its advantage's direction): the top 5 next tokens under each policy, the sampled one first (highlighted). "&lt; p": not
among that policy's top 20, so below its 20th probability.{ref_note}</p>
<div class="dists">{''.join(blocks)}</div>"""


def _surrogate_curve(policy_loss: str, ratio, sign: float, low: float, high: float):
    """What is drawn against r for an advantage of sign ``sign`` and |A| = 1: the clipped surrogate
    min(r A, clip(r, 1 - low, 1 + high) A) (GSPO: of the sequence ratio), or for CISPO the detached
    weight clip(r) A that multiplies grad log pi."""
    import numpy as np

    clipped = np.clip(ratio, 1 - low, 1 + high)
    if policy_loss == "cispo":
        return clipped * sign
    return np.minimum(ratio * sign, clipped * sign)


def _surrogate(r: dict) -> str:
    import numpy as np

    s = r["settings"]
    loss, low, high = s["policy_loss"], s["clip_ratio_low"], s["clip_ratio_high"]
    sequence = loss not in ("ppo_clip", "cispo")
    points = {1.0: [], -1.0: []}  # (ratio, clipped) per sign of A
    zero = 0
    for a in r["answers"]:
        adv = a["advantage"] or 0.0
        if adv == 0.0:
            zero += 1 if sequence else len(a["pieces"])
            continue
        sign = 1.0 if adv > 0 else -1.0
        if sequence:
            if a.get("loss_log_ratio") is not None:
                points[sign].append((math.exp(a["loss_log_ratio"]), bool(a["clipped"])))
        else:
            points[sign] += [(math.exp(x), t in a["clipped"]) for t, x in enumerate(a["log_ratio"]) if x is not None]
    ratios = [x for pts in points.values() for x, _ in pts]
    ranges = [(max(0.0, min([1 - 2 * low] + [0.98 * x for x in ratios])),
               max([1 + 2 * high] + [1.02 * x for x in ratios]))]
    if ratios:  # one step moves r far less than the clip range: a second row zoomed to this step's ratios
        margin = max(0.15 * (max(ratios) - min(ratios)), 1e-6)
        ranges.append((min(ratios) - margin, max(ratios) + margin))
    fig, axes = plt.subplots(len(ranges), 2, figsize=(10, 3.3 * len(ranges)), squeeze=False)
    for row, (lo, hi) in enumerate(ranges):
        for ax, sign in zip(axes[row], (1.0, -1.0)):
            _surrogate_panel(ax, loss, sign, low, high, points[sign], lo, hi, sequence)
            if row:
                ax.set_title(ax.get_title() + " (zoomed)", fontsize=10)
                ax.xaxis.set_major_locator(plt.MaxNLocator(4))  # offset tick labels are long: fewer, or they overlap
    fig.tight_layout()
    if loss == "cispo":
        drawn = ("CISPO has no clipped surrogate: its loss is &minus;sg[clip(r, 1&minus;&epsilon;<sub>low</sub>, "
                 "1+&epsilon;<sub>high</sub>)]&middot;A&middot;log &pi;<sub>&theta;</sub>. Drawn is that detached "
                 "weight times sign(A), which scales the gradient A&middot;&nabla;log &pi; and never makes it 0.")
    else:
        drawn = ("min(r&middot;A, clip(r, 1&minus;&epsilon;<sub>low</sub>, 1+&epsilon;<sub>high</sub>)&middot;A) / |A| "
                 "against r" + (", with GSPO's sequence ratio s<sub>i</sub> (one point per answer) as r" if sequence
                                else ", one point per answer token") + ".")
    s_note = ("one optimizer step per rollout (update_epochs = 1, num_minibatches = 1): the loss itself saw "
              "&pi;<sub>old</sub> = &pi;<sub>&theta;</sub>, r = 1 on every token, so nothing was clipped during the "
              "update. The points are where that step left the ratio: what a second pass would see, and whether "
              "the clip would hold there."
              if s["update_epochs"] == 1 and s["num_minibatches"] == 1 else
              f"{s['update_epochs'] * s['num_minibatches']} optimizer steps per rollout: the loss's passes saw ratios "
              "between 1 and these. The points are the ratio after the last one, with the loss's clipping rule "
              "applied to it.")
    return f"""<h2>The clipped surrogate, with this step's ratios</h2>
<p>{drawn} &epsilon;<sub>low</sub> = {low:g}, &epsilon;<sub>high</sub> = {high:g}. This run makes {s_note}
{f'{zero} tokens/answers with A = 0 are not drawn (their surrogate is 0).' if zero else ''}</p>
{_svg(fig)}"""


def _surrogate_panel(ax, loss: str, sign: float, low: float, high: float, pts: list, lo: float, hi: float,
                     sequence: bool) -> None:
    """One panel: the curve for the sign of A over r in [lo, hi], its clipped side shaded, ``pts`` on it."""
    import numpy as np

    grid = np.linspace(lo, hi, 400)
    ax.plot(grid, _surrogate_curve(loss, grid, sign, low, high), color="black", lw=1.5)
    ax.plot(grid, grid * sign, color="grey", lw=0.8, ls=":", label="r·A (unclipped)")
    spans = [(lo, 1 - low), (1 + high, hi)] if loss == "cispo" else [(1 + high, hi) if sign > 0 else (lo, 1 - low)]
    label = "weight clipped (gradient kept)" if loss == "cispo" else "clipped: no gradient"
    for left, right in spans:
        left, right = max(left, lo), min(right, hi)
        if left < right:
            ax.axvspan(left, right, color="#f4cccc", alpha=0.6, lw=0, label=label)
            label = None
    for flag, colour, marker in ((False, "tab:blue", "o"), (True, "tab:red", "x")):
        xs = np.array([x for x, c in pts if c == flag])
        if xs.size:
            ax.scatter(xs, _surrogate_curve(loss, xs, sign, low, high), s=18, color=colour, marker=marker,
                       zorder=3, alpha=0.7, label=("clipped" if flag else "not clipped") + f" ({xs.size})")
    if lo < 1.0 < hi:
        ax.axvline(1.0, color="grey", lw=0.6)
    ax.set_xlim(lo, hi)
    what = "answers (sequence ratio s_i)" if sequence else "tokens"
    ax.set_title(f"A {'> 0' if sign > 0 else '< 0'}: {len(pts)} {what}", fontsize=10)
    ax.set_xlabel("s_i = (π_θ/π_old)^(1/|y|)" if sequence else "r = π_θ/π_old (after the step's update)")
    ax.set_ylabel("clip(r)·sign(A): CISPO's weight" if loss == "cispo" else "objective / |A|")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)


def _series(records: list[dict], key: str, steps: list[int]) -> list[float]:
    """``key`` at each training step, NaN where it is missing or null (a gap in the line, never a 0)."""
    by_step = {rec["step"]: rec.get(key) for rec in records if "reward/mean" in rec}
    return [by_step.get(step) if by_step.get(step) is not None else float("nan") for step in steps]


def _curves(metrics: list[dict], step: int, settings: dict) -> str:
    if not metrics:
        return "<h2>Over the steps</h2><p class='absent'>No metrics.jsonl in the run directory.</p>"
    import numpy as np

    train_steps = sorted({m["step"] for m in metrics if "reward/mean" in m})
    eval_key = "eval/accuracy" if any(m.get("eval/accuracy") is not None for m in metrics) else "eval/reward"
    evals = [(m["step"], m[eval_key]) for m in metrics if m.get(eval_key) is not None]
    panels = [("reward/mean", "training reward (mean)"), (eval_key, f"held-out {eval_key.split('/')[1]}"),
              ("frac_reward_zero_std", "groups with zero reward spread"), ("kl", "KL to the reference"),
              ("entropy", "entropy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(17, 2.9))
    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.axvline(step, color="tab:red", lw=0.8, ls="--")
        if key == eval_key:
            if evals:
                ax.plot([e[0] for e in evals], [e[1] for e in evals], marker="o", ms=3, color="tab:green")
            else:
                ax.text(0.5, 0.5, "no held-out evaluation logged", ha="center", transform=ax.transAxes, fontsize=8)
            continue
        values = np.array(_series(metrics, key, train_steps), dtype=float)
        if train_steps:
            ax.set_xlim(0, train_steps[-1])
        if np.isnan(values).all():
            why = "absent: beta = 0, no reference model" if key == "kl" and settings["beta"] == 0 else "not logged"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=8)
            continue
        ax.plot(train_steps, values, lw=1, color="tab:blue")
    fig.tight_layout()
    return f"""<h2>Over the steps <span class="dim">(from metrics.jsonl; the dashed line is step {step}; missing values
are gaps, not 0)</span></h2>
{_svg(fig)}"""


def _notes(s: dict) -> str:
    return f"""<h2>How these numbers were computed</h2>
<ul class="dim">
<li>&pi;<sub>old</sub>: the policy that sampled the step, read just before its update; &pi;<sub>&theta;</sub>: the
same policy just after the step's {s['update_epochs'] * s['num_minibatches']} optimizer step(s); &pi;<sub>ref</sub>: the
frozen reference (only when &beta; &gt; 0). All three as the trainer takes them: softmax(logits / {s['temperature']:g}),
one forward per answer without gradients, in eval mode.</li>
<li>Rewards, advantages and the group are what the run trained on. The group is chosen by rule, not at random: the
groups whose rewards differ first, from index (step &minus; 1) mod groups; recording changes no weight, random number
or metric of the run.</li>
<li>Numbers are stored to 4 significant digits. Steps are recorded every {s['every']} step(s), plus the last.</li>
</ul>"""


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style></head>
<body>
{body}
<script>{script}</script>
</body></html>
"""

STYLE = """
body { font-family: sans-serif; margin: 24px; max-width: 1180px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 14px; margin: 14px 0 6px; }
.dim { color: #777; font-weight: normal; font-size: 90%; }
.absent { background: #f6f6f6; border-left: 3px solid #aaa; padding: 6px 10px; }
pre.prompt { background: #f6f6f6; padding: 8px; white-space: pre-wrap; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 3px 7px; vertical-align: top; }
td.num { text-align: right; font-family: monospace; white-space: nowrap; }
td.answer { font-family: monospace; white-space: pre-wrap; max-width: 520px; }
.tokrow { font-family: monospace; font-size: 13px; margin: 3px 0; line-height: 24px; }
.rowlabel { display: inline-block; width: 86px; }
.tok { padding: 2px 3px; margin-right: 2px; border: 1px solid #ddd; border-radius: 3px; cursor: default; }
.tok.clipped { border: 2px solid #000; }
.tok.has-dist { text-decoration: underline; cursor: pointer; }
.legend { font-size: 12px; display: flex; gap: 6px; align-items: center; margin-bottom: 4px; }
.legend .bar { display: inline-block; width: 160px; height: 10px; border: 1px solid #ccc; }
.dists { display: flex; flex-wrap: wrap; gap: 12px; }
.dist { border: 1px solid #ddd; padding: 6px 10px; border-radius: 4px; }
.dist.flash { outline: 3px solid #f0a000; }
.dist tr.sampled td { background: #fff4d6; }
.tokcell { font-family: monospace; }
.context { font-family: monospace; font-size: 12px; margin: 2px 0 6px; }
.pbar { display: inline-block; height: 8px; background: #7aa6d6; margin-right: 4px; vertical-align: middle; }
svg.figure { max-width: 100%; height: auto; }
"""

SCRIPT = """
document.querySelectorAll('.tok.has-dist').forEach(function (chip) {
  chip.addEventListener('click', function () {
    var target = document.getElementById('pos-' + chip.dataset.pos);
    if (!target) { return; }
    target.scrollIntoView({behavior: 'smooth', block: 'center'});
    target.classList.add('flash');
    setTimeout(function () { target.classList.remove('flash'); }, 1500);
  });
});
"""


def describe(path: Path) -> str:
    """What ``policyopt inspect`` prints when it has written the page."""
    return f"wrote {path} ({path.stat().st_size / 1024:.0f} kB); open it in a browser, no server needed"
