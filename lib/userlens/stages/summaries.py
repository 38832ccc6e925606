"""What each stage's result says in a few lines: the command line, the notebooks and the nightly print these."""

from __future__ import annotations

from typing import Any


def ingest(r: Any) -> str:
    return (
        f"ingest: {r.rows_in} rows in -> {r.rows_out} events, {r.quarantined} quarantined, "
        f"{r.duplicates} duplicates; {r.items_out} items (as of {r.as_of_date})"
        + (f"; {len(r.skipped_files)} unreadable file(s) skipped" if r.skipped_files else "")
    )


def textualize(r: Any) -> str:
    return f"textualize: {r.users} user texts as of {r.as_of_date} ({r.texts_inserted} new, {r.texts_updated} changed)"


def embed(r: Any) -> str:
    users, items = r.users, r.items
    return (
        f"embed: users {users.embedded} embedded ({users.texts_embedded} distinct texts), {users.unchanged} "
        f"unchanged, {users.empty} empty; items {items.embedded} embedded, {items.unchanged} unchanged "
        f"(model {r.model_id}, as of {r.as_of_date})"
    )


def train(r: Any) -> str:
    nan = float("nan")
    lines = [
        f"train: model {r.version} in {r.path}",
        f"  cutoff {r.cutoff} (as of {r.as_of_date}); users " + ", ".join(f"{s} {n}" for s, n in r.users.items()),
    ]
    for task, values in r.model.items():
        base = r.baseline.get(task, {})
        if task == "recommend":
            continue
        if "auc" in values:
            lines.append(
                f"  {task:<14} test AUC {values['auc']:.3f}  PR-AUC {values['pr_auc']:.3f}  "
                f"log loss {values['log_loss']:.3f}  ECE {values['ece']:.3f}   "
                f"baseline AUC {base.get('auc', nan):.3f}"
                + (f"  bag of words {words['auc']:.3f}" if (words := r.baseline.get(f"{task} (bag of words)")) else "")
                + {
                    "baseline": "   (head: the baseline's regression, which validated better)",
                    "state probe": "   (head: the regression on the state embedding and the counts, which "
                    "validated better)",
                }.get(r.heads.get(task, ""), "")
            )
        else:
            lines.append(
                f"  {task:<14} test accuracy {values['accuracy']:.3f}  top-3 {values['top3_accuracy']:.3f}"
                f"   baseline {base.get('accuracy', nan):.3f} / {base.get('top3_accuracy', nan):.3f}"
                + (
                    f"  bag of words {words.get('accuracy', nan):.3f} / {words.get('top3_accuracy', nan):.3f}"
                    if (words := r.baseline.get(f"{task} (bag of words)"))
                    else ""
                )
            )
    if "recommend" in r.model:
        fused = r.model["recommend"]
        label = f"userlens (sequential head + {fused['als_weight']:g} x ALS)" if "als_weight" in fused else "userlens"
        methods = {
            label: fused,
            "popularity": r.baseline.get("recommend_popularity", {}),
            "ALS": r.baseline.get("recommend_als", {}),
        }
        names = [n for n in fused if n.split("@")[0] in ("recall", "ndcg", "hit_rate")]
        lines.append(
            f"  recommendations ({r.model['recommend'].get('users', 0)} test users with a next purchase): "
            + "; ".join(f"{m} " + " ".join(f"{n} {v.get(n, nan):.3f}" for n in names) for m, v in methods.items())
        )
    if r.dp:
        lines.append(f"  DP-SGD: epsilon {r.dp['epsilon']:.2f} at delta {r.dp['delta']:g}")
    return "\n".join(lines)


def score(r: Any) -> str:
    return f"score: {r.scored} users scored, {r.unchanged} unchanged (model {r.model_version}, as of {r.as_of_date})"


def gate(r: Any) -> str:
    counted = {status: sum(c.status == status for c in r.checks) for status in ("pass", "fail", "skip")}
    verdict = "passed" if r.passed else ("failed, published by --force" if r.forced else "failed: nothing published")
    lines = [
        f"gate: {verdict} ({counted['pass']} checks passed, {counted['fail']} failed, {counted['skip']} skipped); "
        + (
            f"model {r.candidate} " + ("published" if r.passed or r.forced else "refused")
            if r.candidate
            else f"model {r.model_version} stays"
        )
    ]
    lines += [f"  note: {n}" for n in r.notes]
    lines += [f"  {c.status:4}  {c.line()}" for c in r.checks if c.status != "skip"]
    return "\n".join(lines)


def explain(r: Any) -> str:
    return (
        f"explain: {r.users} users' scores explained ({r.variants} variants scored; "
        f"model {r.model_version}, as of {r.as_of_date})"
    )


def profile(r: Any) -> str:
    return (
        f"profile: {r.users} users as of {r.as_of_date} ({r.inserted} new, {r.updated} changed rows); "
        f"{r.segments_published} segments published, {r.segments_suppressed} suppressed as smaller than "
        f"privacy.min_segment_size ({r.users_in_suppressed_segments} users)"
    )


def quarantine_retention(r: Any) -> str:
    return f"quarantine_retention: {r.deleted} quarantined rows dated before {r.cutoff} deleted, {r.kept} kept"


def report(r: Any) -> str:
    return f"report: {r.path}"


def privacy_check(r: Any) -> str:
    from userlens.stages.privacy_check import format_table

    return format_table(r)


def forget(r: Any) -> str:
    from userlens.stages.forget import describe

    return describe(r)
