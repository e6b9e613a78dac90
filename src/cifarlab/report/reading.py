"""The plain-language reading of a run's results, computed from the numbers only: no class is named in
advance, so the text follows the data (renaming the classes renames the reading)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cifarlab.evaluate import Calibration, EvalResult
from cifarlab.report.common import History, events, join_list, kept_epoch, most_damaging, pct, row


def _conf_list(pairs: Sequence[tuple[str, float]]) -> str:
    return join_list([f"{o} ({s:.0%})" for o, s in pairs])


def headline(ev: EvalResult) -> str:
    wrong_per_100 = round(ev.error_rate * 100)
    return (
        f"The model labels {pct(ev.accuracy, 2)} of the {ev.n:,} {ev.split_name} images correctly "
        f"(about {100 - wrong_per_100} in 100; the right class is among its top {ev.top_k} guesses for "
        f"{pct(ev.top5)})."
    )


def class_sentences(ev: EvalResult) -> list[str]:
    """The strongest classes, the most common mistake on them, and the weakest classes with why."""
    classes = list(ev.classes)
    k = len(classes)
    cm = ev.confusion
    out = []
    n_show = max(1, min(3, k // 4))
    by_f1 = sorted(classes, key=lambda c: (-ev.per_class[c].f1, classes.index(c)))
    strong, weak = by_f1[:n_show], by_f1[::-1][:n_show]
    strong_txt = join_list([f"{c} (F1 {ev.per_class[c].f1:.2f})" for c in strong])
    out.append(f"Strongest {'class' if n_show == 1 else 'classes'}: {strong_txt}.")
    for c in strong:
        if ev.top_confusions[c]:
            o, share = ev.top_confusions[c][0]
            out.append(
                f"The most common mistake on {c}, the strongest class: taken for {o} ({share:.0%} of the {c} images)."
            )
            break
    for c in weak:
        m = ev.per_class[c]
        i = classes.index(c)
        s = f"Weak: {c} (F1 {m.f1:.2f}, precision {m.precision:.2f}, recall {m.recall:.2f})."
        if ev.top_confusions[c]:
            s += (
                f" {pct(1 - m.recall, 0)} of the {c} images are missed, mostly taken for "
                f"{_conf_list(ev.top_confusions[c])}."
            )
        col = [(classes[j], int(cm[j, i])) for j in range(k) if j != i and cm[j, i]]
        col.sort(key=lambda t: -t[1])
        if col:
            s += (
                f" {sum(n for _, n in col):,} images of other classes are called {c}, most often "
                f"{join_list([f'{o} ({n})' for o, n in col[:2]])}."
            )
        if m.recall < m.precision - 0.05:
            s += " Low recall more than low precision: the model misses this class more than it over-predicts it."
        elif m.precision < m.recall - 0.05:
            s += " Low precision more than low recall: the model over-predicts this class."
        out.append(s)
    return out


def pair_sentences(ev: EvalResult) -> list[str]:
    pairs = ev.confused_pairs
    if not pairs:
        return []
    n_wrong = int(ev.confusion.sum() - ev.confusion.trace())
    p = pairs[0]
    out = [
        f"The most confused pair is {p.a} ↔ {p.b}: {p.count:,} mistakes ({p.a} → {p.b} "
        f"{p.a_to_b:,}, {p.b} → {p.a} {p.b_to_a:,}), {p.count / max(1, n_wrong):.0%} of all "
        f"{n_wrong:,} mistakes."
    ]
    if len(pairs) > 1:
        out.append("Next: " + "; ".join(f"{q.a} ↔ {q.b} ({q.count:,})" for q in pairs[1:4]) + ".")
    return out


def calibration_sentence(
    cal: Calibration,
    label_smoothing: float = 0.0,
    n_classes: int = 10,
    temperature: float = 1.0,
    uncalibrated_ece: float | None = None,
    fitted_on: str | None = None,
) -> str:
    """How far the probabilities can be trusted. `temperature`: the run's fitted softmax temperature (the
    probabilities are those of the logits divided by it); `uncalibrated_ece`: the plain softmax's ECE;
    `fitted_on`: what the temperature was fitted on ("1000 training images")."""
    if cal.ece < 0.02:
        cal_txt = "well calibrated"
    elif cal.overconfidence > 0:
        cal_txt = "over-confident"
    else:
        cal_txt = "under-confident"
    what = "the softmax output" if temperature == 1.0 else f"the softmax at the run's temperature {temperature:.3g}"
    before = f"; {pct(uncalibrated_ece)} without it" if uncalibrated_ece is not None else ""
    s = (
        f"Calibration: {what} read as a probability is {cal_txt} (ECE {pct(cal.ece)}{before}; mean "
        f"confidence {pct(cal.mean_confidence)} against accuracy {pct(cal.accuracy)})."
    )
    hc = cal.high_confidence
    if hc.accuracy is not None:
        s += (
            f" Predictions made with at least {hc.threshold:.0%} confidence ({hc.share:.0%} of images) are "
            f"right {pct(hc.accuracy)} of the time."
        )
    if temperature != 1.0 and uncalibrated_ece is not None and uncalibrated_ece > cal.ece:
        s += (
            " The temperature was fitted after training (cifarlab.calibrate); predict, serve and export apply it, "
            "and it changes no prediction, only how sure each one claims to be."
        )
        if "training" in (fitted_on or "") and cal.overconfidence > 0.02:
            s += (
                f" It was fitted on {fitted_on}, which the model knows better than new ones (the run has no "
                "validation split), so it came out too low and the probabilities are a little too sure; for an "
                "unbiased fit hold out images with --set val_fraction=0.02 (1,000 of CIFAR-10's)."
            )
    elif cal.ece >= 0.02 and cal.overconfidence <= 0 and label_smoothing > 0:
        target = 1 - label_smoothing + label_smoothing / n_classes
        s += (
            f" Expected with label smoothing {label_smoothing:g}: training pulls the right class's probability towards "
            f"{target:.0%}, never 100%; where calibrated probabilities matter, train with --set calibrate=true "
            "(a softmax temperature fitted after training, which predict, serve and export apply)."
        )
    return s


def generalisation_sentence(ev: EvalResult, history: History, metrics: dict[str, Any]) -> str | None:
    """Train vs validation vs evaluated-split accuracy at the kept epoch, and what the gap says.

    No conclusion is drawn when the data evaluated is not the run's (checksum mismatch): its accuracy
    says nothing about how this run generalises."""
    split = ev.split_name
    kept = kept_epoch(history, metrics)
    r = row(history, kept)
    train_acc = r.get("accuracy")
    val_acc = r.get("val_accuracy")
    if train_acc is None:
        return None
    if ev.dataset_mismatch:
        return (
            f"No conclusion about overfitting or generalisation: the {split} images evaluated are not from the "
            f"data this run was trained on (the dataset checksums differ), so the {split} accuracy "
            f"({pct(ev.accuracy)}) cannot be compared with the training accuracy of epoch {kept} "
            f"({pct(train_acc)})."
        )
    gap = train_acc - ev.accuracy
    s = f"Generalisation (epoch {kept}, the weights kept): train {pct(train_acc)}"
    s += f", validation {pct(val_acc)}" if val_acc is not None else ""
    s += f", {split} {pct(ev.accuracy)}: "
    if gap < 0.01:
        s += (
            f"the {split} accuracy is not below the training accuracy (training accuracy is measured on "
            "augmented images, in training mode), so there is no sign of overfitting."
            if gap <= 0
            else f"a gap of {gap * 100:.1f} points: almost no overfitting."
        )
    elif gap < 0.03:
        s += f"a gap of {gap * 100:.1f} points: slight overfitting."
    elif gap < 0.06:
        s += f"a gap of {gap * 100:.1f} points: moderate overfitting."
    else:
        s += f"a gap of {gap * 100:.1f} points: clear overfitting."
    return s


def training_sentence(history: History, metrics: dict[str, Any]) -> str:
    drops = events(history, "lr_reduced")
    stops = events(history, "early_stop")
    parts = [f"Training ran {len(history)} epochs"]
    if drops:
        parts.append(
            f"the learning rate was reduced after epoch{'s' if len(drops) > 1 else ''} "
            f"{join_list([str(e) for e in drops])}"
        )
    if stops:
        parts.append(f"early stopping ended it after epoch {stops[-1]}")
    if metrics.get("restored_epoch"):
        parts.append(f"the weights of epoch {metrics['restored_epoch']} were restored")
    return ", ".join(parts) + "."


def robustness_sentence(rob: dict[str, Any] | None) -> str | None:
    """The mean corruption accuracy, its drop from clean, and the most damaging corruption."""
    if not rob or "results" not in rob:
        return None
    worst = most_damaging(rob)
    clean = rob.get("clean_accuracy")
    s = f"Robustness: on corrupted test images the accuracy averages {pct(rob['mean_accuracy'])}"
    if clean is not None:
        s += f" against {pct(clean)} on the same images uncorrupted"
    if rob.get("relative_drop") is not None:
        s += f" (a relative drop of {pct(rob['relative_drop'])})"
    s += "."
    if worst:
        name, mean = worst
        by_sev = rob["results"][name]
        top = max(by_sev)
        s += (
            f" The most damaging corruption is {name}: {pct(mean)} on average over its severities, "
            f"{pct(by_sev[top])} at severity {top}."
        )
    return s


def plain_reading(
    ev: EvalResult,
    history: History,
    metrics: dict[str, Any],
    robustness: dict[str, Any] | None = None,
    label_smoothing: float = 0.0,
) -> list[str]:
    """A short reading of the results, derived from the numbers only (no class is named in advance).
    `label_smoothing`: the recipe's, which explains an under-confident model."""
    inf = ev.inference
    cal = calibration_sentence(
        ev.calibration,
        label_smoothing,
        len(ev.classes),
        temperature=inf.temperature if inf else 1.0,
        uncalibrated_ece=inf.uncalibrated_ece if inf else None,
        fitted_on=inf.temperature_fitted_on if inf else None,
    )
    out = [headline(ev), *class_sentences(ev), *pair_sentences(ev), cal]
    rob = robustness_sentence(robustness)
    if rob:
        out.append(rob)
    if history:
        gen = generalisation_sentence(ev, history, metrics)
        if gen:
            out.append(gen)
        out.append(training_sentence(history, metrics))
    return out
