"""The plain-language reading of a run's results, computed from the numbers only: no class is named in
advance, so the text follows the data (renaming the classes renames the reading)."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from cifarlab.calibrate import CALIBRATION_IMAGES, at_bound
from cifarlab.evaluate import Calibration, EvalResult, TrainingState, top_confusion_counts
from cifarlab.report.common import History, events, join_list, kept_epoch, loss_text, most_damaging, pct, row
from cifarlab.text import plural

# A class is called weak when its F1 is at least WEAK_MARGIN below the macro F1 over the classes present
# (strongest: at least WEAK_MARGIN above it): the ranking alone would call the last of ten 0.99-F1 classes weak.
WEAK_MARGIN = 0.05
# When every class present reaches this F1, none is singled out: the reading says they all do.
NEAR_PERFECT_F1 = 0.95
# Overfitting is claimed only with the losses to show it (training accuracy is measured in training mode, on
# augmented images, so its gap to the test accuracy alone proves nothing): the validation loss rose at least
# VAL_RISE above its lowest, two or more epochs later, while the training loss kept falling; or, after at least
# MIN_EPOCHS epochs, the validation loss is LOSS_RATIO times the training loss or more.
VAL_RISE = 1.05
LOSS_RATIO = 1.2
MIN_EPOCHS = 3
# A collapsed (or diverged) model: one class takes at least ONE_CLASS_SHARE of the predictions with an accuracy
# within NEAR_CHANCE of what always guessing the commonest class gets; or a loss that is not finite, or above
# LOSS_BLOWUP times the chance loss ln(k) (training loss: TRAIN_LOSS_BLOWUP times).
ONE_CLASS_SHARE = 0.9
NEAR_CHANCE = 0.05
LOSS_BLOWUP = 10.0
TRAIN_LOSS_BLOWUP = 3.0
# How the calibration reading words the size of the ECE: under the first bound "slightly", under the second
# plainly, above it "badly" (the ECE is the mean gap between confidence and accuracy).
ECE_SLIGHT, ECE_CLEAR = 0.05, 0.15


def share(count: int, total: int) -> str:
    """`count` of `total` as a percentage, rounded half up from the counts themselves (so that two shares of
    the same counts always read alike): one decimal under 10% ('2.5%', '5.0%'), none above ('63%')."""
    if total <= 0:
        return "–"
    v = Fraction(100 * count, total)
    if 0 < v < 10:
        tenths = math.floor(v * 10 + Fraction(1, 2))
        return f"{tenths // 10}.{tenths % 10}%"
    return f"{math.floor(v + Fraction(1, 2))}%"


def collapse_sentence(ev: EvalResult, history: History) -> str | None:
    """Whether the model is degenerate (training diverged, or it collapsed onto one class), said plainly; None
    for a working model. The thresholds: ONE_CLASS_SHARE, NEAR_CHANCE, LOSS_BLOWUP, TRAIN_LOSS_BLOWUP."""
    k, n = len(ev.classes), int(ev.confusion.sum())
    if k < 2 or n <= 0:
        return None
    chance_loss = math.log(k)
    predicted = ev.confusion.sum(axis=0)
    top = int(predicted.argmax())
    top_share = float(predicted[top]) / n
    chance = max(1 / k, float(ev.confusion.sum(axis=1).max()) / n)  # or always guessing the commonest class
    near_chance = ev.accuracy <= chance + NEAR_CHANCE
    one_class = top_share >= ONE_CLASS_SHARE and near_chance
    signs: list[str] = []
    if one_class:
        who = "all" if int(predicted[top]) == n else f"{share(int(predicted[top]), n)} of the"
        signs.append(
            f"it predicts {ev.classes[top]} for {who} {plural(n, f'{ev.split_name} image')}, so its accuracy "
            f"({pct(ev.accuracy)}) is that of guessing (chance: {pct(chance)})"
        )
    test_loss = float(ev.loss)
    if not math.isfinite(test_loss) or test_loss > LOSS_BLOWUP * chance_loss:
        signs.append(
            f"its {ev.split_name} loss is {loss_text(test_loss)}, against {chance_loss:.2f} (ln {k}) for a model "
            "that guesses evenly"
        )
    last = history[-1] if history else {}
    train_loss = last.get("loss")
    if isinstance(train_loss, (int, float)) and not isinstance(train_loss, bool):
        if not math.isfinite(train_loss) or train_loss > TRAIN_LOSS_BLOWUP * chance_loss:
            signs.append(
                f"its training loss at the last epoch, {loss_text(float(train_loss))}, is far above chance "
                f"({chance_loss:.2f})"
            )
    if not signs:
        return None
    diverged = len(signs) > 1 or not one_class
    what = "training diverged" if diverged else "the model collapsed onto one class"
    return (
        f"This model does not work: {'; '.join(signs)}. In short, {what}: lower the learning rate (--set lr=...) "
        "or shorten its warm-up, and check the data and labels. The calibration and overfitting readings do not "
        "apply to such a model and are left out."
    )


def headline(ev: EvalResult) -> str:
    wrong_per_100 = round(ev.error_rate * 100)
    s = (
        f"The model labels {pct(ev.accuracy, 2)} of the {plural(ev.n, f'{ev.split_name} image')} correctly "
        f"(about {100 - wrong_per_100} in 100"
    )
    if ev.top_k_informative:  # with k >= the number of classes every label is in the top k: 100% says nothing
        s += f"; the right class is among its top {ev.top_k} guesses for {pct(ev.top5)}"
    return s + ")."


def class_sentences(ev: EvalResult) -> list[str]:
    """The strongest classes, the most common mistake on them, and the weakest classes with why; classes with
    no image in the split are named as such and left out."""
    classes = list(ev.classes)
    k = len(classes)
    cm = ev.confusion
    confusions = top_confusion_counts(cm, classes)
    out = []
    present = list(ev.present_classes)
    absent = [c for c in classes if c not in present]
    if absent:
        out.append(
            f"The {ev.split_name} images include no {join_list(absent)}: "
            f"{'its' if len(absent) == 1 else 'their'} precision, recall and F1 are not applicable, and the macro "
            f"averages are over the {plural(len(present), 'class', 'classes')} present."
        )
    if not present:
        return out
    f1 = {c: ev.per_class[c].f1 for c in present}
    lowest = min(present, key=lambda c: (f1[c], classes.index(c)))
    if f1[lowest] >= NEAR_PERFECT_F1:
        if f1[lowest] == 1.0:
            out.append("Every class is recognised perfectly (F1 1.00).")
        else:
            out.append(
                f"Every class has an F1 of at least {NEAR_PERFECT_F1:.2f} (the lowest: {lowest}, "
                f"{f1[lowest]:.2f}), so none is singled out as weak."
            )
        return out
    macro = ev.macro_avg.f1
    n_show = max(1, min(3, len(present) // 4))
    # Ties broken by class order both ways; the classes tied with the last one shown are named too
    by_f1 = sorted(present, key=lambda c: (-f1[c], classes.index(c)))
    by_low = sorted(present, key=lambda c: (f1[c], classes.index(c)))
    strong = [c for c in by_f1[:n_show] if f1[c] >= macro + WEAK_MARGIN]
    weak = [c for c in by_low[:n_show] if f1[c] <= macro - WEAK_MARGIN]
    strong_tied = [c for c in by_f1[n_show:] if strong and f1[c] == f1[strong[-1]]]
    weak_tied = [c for c in by_low[n_show:] if weak and f1[c] == f1[weak[-1]]]
    if strong:
        strong_txt = join_list([f"{c} (F1 {f1[c]:.2f})" for c in strong])
        if strong_tied:
            strong_txt += f", and {join_list(strong_tied)} at the same F1"
        out.append(f"Strongest {'class' if len(strong) == 1 else 'classes'}: {strong_txt}.")
        for c in strong:
            confs = confusions[c]
            if confs:
                o, n = confs[0]
                support = ev.per_class[c].support
                out.append(
                    f"The most common mistake on {c}, the strongest class: taken for {o} ({n:,} of the "
                    f"{plural(support, f'{c} image')}, {share(n, support)})."
                )
                break
    for c in weak:
        m = ev.per_class[c]
        i = classes.index(c)
        s = f"Weak: {c} (F1 {m.f1:.2f}, precision {m.precision:.2f}, recall {m.recall:.2f})."
        missed = m.support - int(cm[i, i])
        confs = confusions[c]
        if missed and confs:
            # Both the missed share and each confusion's come from the counts, rounded alike.
            s += (
                f" {missed:,} of the {plural(m.support, f'{c} image')} ({share(missed, m.support)}) "
                f"{'is' if missed == 1 else 'are'} missed, {'mostly ' if len(confs) > 1 else ''}taken for "
                f"{join_list([f'{o} ({share(n, m.support)})' for o, n in confs])}."
            )
        col = [(classes[j], int(cm[j, i])) for j in range(k) if j != i and cm[j, i]]
        col.sort(key=lambda t: -t[1])
        total = sum(n for _, n in col)
        if total == 1:
            s += f" 1 image of another class ({col[0][0]}) is called {c}."
        elif col:
            s += (
                f" {total:,} images of other classes are called {c}, {'most often ' if len(col) > 1 else ''}"
                f"{join_list([f'{o} ({n})' for o, n in col[:2]])}."
            )
        if m.recall < m.precision - 0.05:
            s += " Low recall more than low precision: the model misses this class more than it over-predicts it."
        elif m.precision < m.recall - 0.05:
            s += " Low precision more than low recall: the model over-predicts this class."
        out.append(s)
    if weak_tied:
        out.append(
            f"As weak, at the same F1 ({f1[weak[-1]]:.2f}): {join_list(weak_tied)} (Table 2 has their precision and "
            "recall)."
        )
    if not weak:
        out.append(
            f"No class is far below the others: the F1 of every class is within {WEAK_MARGIN:.2f} of the macro F1 "
            f"({macro:.2f}) or above it (the lowest: {lowest}, {f1[lowest]:.2f})."
        )
    return out


def pair_sentences(ev: EvalResult) -> list[str]:
    pairs = ev.confused_pairs
    if not pairs:
        return []
    n_wrong = int(ev.confusion.sum() - ev.confusion.trace())
    p = pairs[0]
    if n_wrong == 1:
        of_all = "the only mistake"
    elif p.count == n_wrong:
        of_all = f"all {n_wrong:,} mistakes"
    else:
        of_all = f"{share(p.count, n_wrong)} of all {n_wrong:,} mistakes"
    out = [
        f"The most confused pair is {p.a} ↔ {p.b}: {plural(p.count, 'mistake')} ({p.a} → {p.b} "
        f"{p.a_to_b:,}, {p.b} → {p.a} {p.b_to_a:,}), {of_all}."
    ]
    if len(pairs) > 1:
        out.append("Next: " + "; ".join(f"{q.a} ↔ {q.b} ({q.count:,})" for q in pairs[1:4]) + ".")
    return out


def _refit_advice(fitted_on: str | None) -> str:
    """How to get a temperature worth trusting, given what it was fitted on ("1000 training images", "80 validation
    images"): held-out images for a fit on training images; more of them for a small validation split; nothing to
    add ("") when it already had a thousand held-out images."""
    if fitted_on is None or "training" in fitted_on:
        return "retrain with --set val_fraction=0.02 so that it is fitted on held-out images"
    count = re.match(r"\s*(\d+)", fitted_on)
    if count is not None and int(count.group(1)) < CALIBRATION_IMAGES:
        return f"it was fitted on only {fitted_on}: a larger validation split (--set val_fraction) gives a steadier fit"
    return ""


def _degree(ece: float) -> str:
    """The size of a miscalibration, as a prefix: "slightly ", "" or "badly " (ECE_SLIGHT, ECE_CLEAR)."""
    return "slightly " if ece < ECE_SLIGHT else "" if ece < ECE_CLEAR else "badly "


def _too_sure(ece: float) -> str:
    return "a little too sure" if ece < ECE_SLIGHT else "too sure" if ece < ECE_CLEAR else "far too sure"


def _share_text(v: float) -> str:
    """A share as a whole percentage, except where that would misstate it: a non-empty share under 1% reads
    "0.4%" (or "<0.1%"), a share short of all of them never reads "100%"."""
    if 0 < v < 0.01:
        return f"{v:.1%}" if v >= 0.001 else "<0.1%"
    if 0.99 < v < 1:
        return f"{v:.1%}" if v <= 0.999 else ">99.9%"
    return f"{v:.0%}"


def calibration_sentence(
    cal: Calibration,
    label_smoothing: float = 0.0,
    n_classes: int = 10,
    temperature: float = 1.0,
    uncalibrated_ece: float | None = None,
    fitted_on: str | None = None,
    *,
    loss: float | None = None,
    uncalibrated_loss: float | None = None,
    fit_loss: float | None = None,
    state: str | None = None,
    run_dir: str = "RUN_DIR",
    resume: str = "",
) -> str:
    """How far the probabilities can be trusted. `temperature`: the run's fitted softmax temperature (the
    probabilities are those of the logits divided by it); `uncalibrated_ece`/`uncalibrated_loss`: the plain
    softmax's ECE and loss (`loss`: at the temperature); `fitted_on`: what the temperature was fitted on ("1000
    training images"), `fit_loss`: the loss it reached there. `state`: where the run's temperature stands, so the
    advice matches it: "off" (switched off with cifarlab calibrate --off), "pending" (the recipe fits one when
    training finishes, and it has not finished), "no" (the recipe fits none), None (not known)."""
    from cifarlab.calibrate import T_RANGE

    before = f"; {pct(uncalibrated_ece)} without it" if uncalibrated_ece is not None else ""
    bound = at_bound(temperature)
    undo = f"cifarlab calibrate {run_dir} --off removes it"
    held_out = _refit_advice(fitted_on)
    if bound:
        why = (
            f"the {fitted_on or 'images it was fitted on'} are all right with full confidence"
            + (f" (fit loss {fit_loss:.4f})" if fit_loss is not None else "")
            + ", so a sharper softmax always looked better"
            if bound == "lower"
            else f"the model is so often wrong on the {fitted_on or 'images it was fitted on'} that the fit "
            "flattened every probability"
        )
        return (
            f"Calibration: the run's softmax temperature {temperature:.3g} is at the {bound} bound of its fit range "
            f"({T_RANGE[0]:g} to {T_RANGE[1]:g}): the fit is degenerate ({why}), and the temperature should not be "
            f"trusted, whatever its ECE here ({pct(cal.ece)}{before}); {held_out + ', or ' if held_out else ''}{undo}."
        )
    degree = _degree(cal.ece)
    if cal.ece < 0.02:
        cal_txt = "well calibrated"
    elif cal.overconfidence > 0:
        cal_txt = f"{degree}over-confident"
    else:
        cal_txt = f"{degree}under-confident"
    what = "the softmax output" if temperature == 1.0 else f"the softmax at the run's temperature {temperature:.3g}"
    s = (
        f"Calibration: {what} read as a probability is {cal_txt} (ECE {pct(cal.ece)}{before}; mean "
        f"confidence {pct(cal.mean_confidence)} against accuracy {pct(cal.accuracy)})."
    )
    hc = cal.high_confidence
    if hc.accuracy is not None:
        s += (
            f" Predictions made with at least {hc.threshold:.0%} confidence ({_share_text(hc.share)} of images) are "
            f"right {pct(hc.accuracy)} of the time."
        )
    worse_ece = temperature != 1.0 and uncalibrated_ece is not None and cal.ece > uncalibrated_ece + 0.005
    worse_loss = (
        temperature != 1.0 and loss is not None and uncalibrated_loss is not None and loss > uncalibrated_loss + 0.005
    )
    if worse_ece or worse_loss:
        # Each measure where it belongs: a loss that fell is not evidence of "worse" (QA)
        worse: list[str] = []
        better: list[str] = []
        if uncalibrated_ece is not None:
            (worse if worse_ece else better).append(f"ECE {pct(uncalibrated_ece)} without it, {pct(cal.ece)} with it")
        if loss is not None and uncalibrated_loss is not None:
            (worse if worse_loss else better).append(f"loss {uncalibrated_loss:.3f} without it, {loss:.3f} with it")
        s += f" The fitted temperature made the probabilities worse, not better ({'; '.join(worse)})"
        s += f", though not by every measure ({'; '.join(better)})." if better else "."
        if "training" in (fitted_on or ""):
            s += f" It was fitted on {fitted_on}, which the model knows better than new ones."
        s += f" Do not rely on it: {held_out + ', or ' if held_out else ''}{undo}."
    elif temperature != 1.0 and uncalibrated_ece is not None and uncalibrated_ece > cal.ece:
        s += (
            " The temperature was fitted after training (cifarlab.calibrate); predict, serve and export apply it, "
            "and it changes no prediction, only how sure each one claims to be."
        )
        if "training" in (fitted_on or "") and cal.overconfidence > 0.02:
            # "too low" only where the fit sharpened the probabilities (T < 1); a softening one was too weak
            sure = _too_sure(cal.ece)
            how = (
                f"so it came out too low (a temperature under 1 sharpens the probabilities), and they are {sure}"
                if temperature < 1.0
                else f"so it softened the probabilities less than new images need, and they are still {sure}"
            )
            s += (
                f" It was fitted on {fitted_on}, which the model knows better than new ones (the run has no "
                f"validation split), {how}; for an unbiased fit hold out images with --set val_fraction=0.02 (2% of "
                "the training images)."
            )
    elif state == "off" and temperature == 1.0:
        s += (
            f" The run's fitted temperature was switched off (cifarlab calibrate --off); cifarlab calibrate "
            f"{run_dir} fits it again."
        )
    elif state == "pending" and temperature == 1.0:
        s += (
            " The recipe fits a softmax temperature (calibrate=true) when training finishes, and this run has not "
            f"finished: resume it ({resume or f'cifarlab train --resume {run_dir}'}) to get one."
        )
    elif cal.ece >= 0.02 and cal.overconfidence <= 0 and label_smoothing > 0:
        target = 1 - label_smoothing + label_smoothing / n_classes
        s += (
            f" Expected with label smoothing {label_smoothing:g}: training pulls the right class's probability towards "
            f"{target:.0%}, never 100%; where calibrated probabilities matter, train with --set calibrate=true "
            "(a softmax temperature fitted after training, which predict, serve and export apply)"
            + (f", or fit one to this run: cifarlab calibrate {run_dir}." if state == "no" else ".")
        )
    return s


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def overfitting_evidence(history: History, kept: int | None) -> str | None:
    """What in the losses shows overfitting (the rule: see VAL_RISE, LOSS_RATIO), or None when nothing does."""
    rows = [r for r in history if _num(r.get("val_loss")) is not None and _num(r.get("loss")) is not None]
    if len(rows) >= MIN_EPOCHS:
        best = min(rows, key=lambda r: float(r["val_loss"]))
        last = rows[-1]
        if (
            int(last["epoch"]) - int(best["epoch"]) >= 2
            and float(last["val_loss"]) >= VAL_RISE * float(best["val_loss"])
            and float(last["loss"]) < float(best["loss"])
        ):
            s = (
                f"the validation loss rose from {float(best['val_loss']):.3f} (epoch {best['epoch']}) to "
                f"{float(last['val_loss']):.3f} (epoch {last['epoch']}) while the training loss kept falling "
                f"({float(best['loss']):.3f} to {float(last['loss']):.3f}): overfitting"
            )
            if kept is not None and kept <= int(best["epoch"]):
                s += f", after the weights kept (epoch {kept}) were trained"
            return s
    r = row(history, kept)
    val_loss, train_loss = _num(r.get("val_loss")), _num(r.get("loss"))
    if len(history) >= MIN_EPOCHS and val_loss is not None and train_loss and val_loss >= LOSS_RATIO * train_loss:
        return (
            f"the validation loss ({val_loss:.3f}) is well above the training loss ({train_loss:.3f}) after "
            f"{plural(len(history), 'epoch')}: a sign of overfitting"
        )
    return None


def generalisation_sentence(ev: EvalResult, history: History, metrics: dict[str, Any]) -> str | None:
    """Train vs validation vs evaluated-split accuracy at the kept epoch, and what the losses say about it.

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
    mode = "training accuracy is measured on augmented images, in training mode"
    evidence = overfitting_evidence(history, kept)
    if evidence:
        return s + (f"a gap of {gap * 100:.1f} points, and {evidence}." if gap > 0 else f"{evidence}.")
    if gap <= 0:
        return s + f"the {split} accuracy is not below the training accuracy ({mode}): no sign of overfitting."
    s += f"a gap of {gap * 100:.1f} points, but {mode}, so the gap alone does not show overfitting"
    val_loss, train_loss = _num(r.get("val_loss")), _num(r.get("loss"))
    if val_loss is not None and train_loss is not None and val_loss <= train_loss:
        s += f"; the validation loss ({val_loss:.3f}) is not above the training loss ({train_loss:.3f})"
    elif val_loss is None:
        s += "; without a validation split the losses cannot tell (--set val_fraction=0.1 adds one)"
    return s + "."


def training_sentence(history: History, metrics: dict[str, Any], state: TrainingState | None = None) -> str:
    """How training ran and ended: finished, stopped (Ctrl-C), cut at a time budget, resumed; the learning-rate
    drops, early stopping and restored weights. `state`: what the run's files say (`EvalResult.training`)."""
    n = len(history)
    drops = events(history, "lr_reduced")
    stops = events(history, "early_stop")
    status = state.status if state is not None else metrics.get("status")
    planned = state.planned_epochs if state is not None else None
    budget = metrics.get("budget") if isinstance(metrics.get("budget"), dict) else None
    resume_with = state.resume_command if state is not None else "cifarlab train --resume RUN_DIR"
    resume = ""
    if status == "stopped":
        first = f"Training was stopped (interrupted) after {plural(n, 'epoch')}" + (
            f" of the {planned} planned" if planned else ""
        )
        resume = f"continue it with {resume_with}"
    elif status not in (None, "finished"):
        first = f"Training did not finish (status {status}) after {plural(n, 'epoch')}" + (
            f" of the {planned} planned" if planned else ""
        )
    elif budget and _num(budget.get("budget_seconds")):
        per_epoch = budget.get("steps_per_epoch")
        last_steps = state.last_epoch_steps if state is not None else None
        first = f"Training stopped at its time budget ({float(budget['budget_seconds']):g} s)"
        if isinstance(per_epoch, int) and last_steps is not None and last_steps < per_epoch:
            first += f" partway through epoch {n} ({last_steps} of its {per_epoch} steps ran)"
        else:
            first += f" after {plural(n, 'epoch')}"
        planned_b = budget.get("epochs") or planned
        predicted = budget.get("predicted_epochs")
        if _num(predicted):  # the plan's own figure, as the summary table gives it (epochs is its ceiling)
            first += f", against ~{float(predicted):.1f} epochs planned"
        elif planned_b:
            first += f", against {plural(int(planned_b), 'epoch')} planned"
    elif planned and n < planned and not stops:
        first = f"Training ran {n} of the {planned} planned epochs"
    else:
        first = f"Training ran {plural(n, 'epoch')}" + (f" of the {planned} planned" if planned and n < planned else "")
    parts = [first]
    sessions = (
        (metrics.get("timings") or {}).get("session_seconds") if isinstance(metrics.get("timings"), dict) else None
    )
    if isinstance(sessions, list) and len(sessions) > 1:
        parts.append(f"it was resumed: {len(sessions)} training sessions")
    if drops:
        parts.append(
            f"the learning rate was reduced after epoch{'s' if len(drops) > 1 else ''} "
            f"{join_list([str(e) for e in drops])}"
        )
    if stops:
        parts.append(f"early stopping ended it after epoch {stops[-1]}")
    restored = metrics.get("restored_epoch")
    if restored and history and restored == history[-1].get("epoch"):
        parts.append(f"its last epoch, {restored}, was also its best: the weights kept are the last ones")
    elif restored:
        parts.append(f"the weights of epoch {restored} were restored")
    s = ", ".join(parts)
    return s + (f"; {resume}." if resume else ".")


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


def calibration_state(ev: EvalResult, metrics: dict[str, Any]) -> str | None:
    """Where the run's temperature stands, for `calibration_sentence`'s `state` (None when not known)."""
    st = ev.training
    if st is None:
        return None
    if not st.calibrate:
        return "no"
    if st.status not in (None, "finished"):
        return "pending"  # the fit runs when training finishes
    if "calibration" in metrics and metrics["calibration"] is None:
        return "off"  # cifarlab calibrate --off sets the entry to null; training with calibrate=true fills it
    return None


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
    entry = metrics.get("calibration")
    fit: dict[str, Any] = entry if isinstance(entry, dict) else {}
    cal = calibration_sentence(
        ev.calibration,
        label_smoothing,
        len(ev.classes),
        temperature=inf.temperature if inf else 1.0,
        uncalibrated_ece=inf.uncalibrated_ece if inf else None,
        fitted_on=inf.temperature_fitted_on if inf else None,
        loss=ev.loss,
        uncalibrated_loss=inf.uncalibrated_loss if inf else None,
        fit_loss=_num(fit.get("fit_loss_after")),
        state=calibration_state(ev, metrics),
        run_dir=ev.training.run_dir if ev.training else "RUN_DIR",
        resume=ev.training.resume_command if ev.training else "",
    )
    # A degenerate model is said first, and the calibration and overfitting advice, which assume a working one,
    # is left out (QA: temperature advice and "no sign of overfitting" for a model with a test loss of 1e16).
    collapsed = collapse_sentence(ev, history)
    out = [*([collapsed] if collapsed else []), headline(ev), *class_sentences(ev), *pair_sentences(ev)]
    if not collapsed:
        out.append(cal)
    rob = robustness_sentence(robustness)
    if rob:
        out.append(rob)
    if history:
        gen = generalisation_sentence(ev, history, metrics) if not collapsed else None
        if gen:
            out.append(gen)
        out.append(training_sentence(history, metrics, ev.training))
    return out
