"""The trainer: both phases, LoRA or full, one process or many (accelerate), resumable.

A plain loop in the spirit of nanoGPT rather than a `transformers.Trainer` subclass: the loss
already lives in `ESSModel.forward`, and the loop must checkpoint in safetensors only (Trainer
pickles optimizer and RNG state) and resume on exactly the next step (the data order is a
function of the seed and the step, so a resumed run sees the batches the killed one would have).
The alignment phase interleaves replay steps on the pretraining-phase windows (`replay_every`),
so that [CLS] keeps judging response text while it learns to judge queries.

Run folder layout:
    train_config.json          the settings; a rerun with the same --out must match them
    train_log.jsonl            one line per step: phase, step, replay, loss, lm/cls loss, cls accuracy, tokens/s
    checkpoints/latest         name of the newest complete checkpoint (written last, atomically)
    checkpoints/<phase>-<step>/model/ ESS checkpoint; optimizer.safetensors; state.json
    final/                     the trained ESS model
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .baseline import METHOD_FILE, is_baseline, save_plain
from .calibration import CalibrationConfig, CalibrationError, calibrate_response_threshold, describe
from .config import TrainConfig
from .data.augment import augment_examples
from .data.encoding import ChatEncoder, Encoded
from .data.loaders import load_examples
from .data.recipe import alignment_examples, answer_starts, load_sources, pretraining_texts
from .data.recovery import baseline_items
from .data.schema import LABELS
from .fields import check
from .generation import Policy
from .masks import Phase
from .model import CONFIG_FILE, ESSModel
from .precision import PrecisionError, accelerate_mode, check_master_weights, resolve, weight_dtype
from .schedule import Schedule, lr_factor

logger = logging.getLogger(__name__)

PHASES = {"pretrain": [Phase.PRETRAIN], "align": [Phase.ALIGN], "both": [Phase.PRETRAIN, Phase.ALIGN]}


class TrainingError(RuntimeError):
    """A run that cannot start as asked (the message says why and what to do)."""


def train(config: TrainConfig, base: str) -> Path:
    """Train an ESS model over `base`; returns the folder of the final model."""
    from accelerate import Accelerator

    check(config, TrainingError)  # a config changed after it was built
    baseline = is_baseline(config.method)
    if baseline and config.phase == "pretrain":
        raise TrainingError(f"--method {config.method} has no [CLS] to pretrain: use --phase align or both")
    # A baseline trains the alignment phase only: the pretraining phase teaches [CLS] to judge text.
    phases = [Phase.ALIGN] if baseline else PHASES[config.phase]
    response_calibration = _response_calibration(config) if Phase.ALIGN in phases and not baseline else None
    try:
        precision = resolve(config.precision, config.full)
    except PrecisionError as error:
        raise TrainingError(str(error)) from None
    # Without CUDA, processes started by `accelerate launch` join one gloo process group (MULTI_CPU).
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=accelerate_mode(precision))
    out = Path(config.out)
    final = out / "final"
    if (final / CONFIG_FILE).exists() or (final / METHOD_FILE).exists():
        _log(accelerator, f"{out}: training already finished; the model is in {final}")
        return final
    # Every data file is read before the model loads: a bad row fails at once.
    examples = load_sources(config.data)
    pretrain_examples = load_sources(config.pretrain_data) if config.pretrain_data else examples
    _check_same_run(out, config, base, accelerator)

    checkpoint = _latest_checkpoint(out)
    torch.manual_seed(config.seed)
    if checkpoint is None:
        model = ESSModel.from_base(base, adapter="full" if config.full else "lora", dtype=weight_dtype(precision))
        state = {"phase": None, "step": 0, "phases_done": []}
    else:
        model = ESSModel.from_pretrained(checkpoint / "model", dtype=weight_dtype(precision), trainable=True)
        state = json.loads((checkpoint / "state.json").read_text())
        _log(accelerator, f"resuming from {checkpoint}")
    try:
        check_master_weights(model, config.full)
    except PrecisionError as error:
        raise TrainingError(str(error)) from None
    model.to(accelerator.device).train()
    encoder = ChatEncoder.for_model(model, config.max_length)

    for phase in phases:
        if phase in state["phases_done"]:
            continue
        # The first process generates and caches the base model's answers; the others read them.
        with accelerator.main_process_first():
            items, replay = _phase_items(phase, config, model, encoder, examples, pretrain_examples)
        start = state["step"] if state["phase"] == phase else 0
        optimizer_state = checkpoint / "optimizer.safetensors" if checkpoint and start else None
        _run_phase(
            phase, items, replay, model, encoder, config, accelerator, out, start, optimizer_state, state["phases_done"]
        )
        state = {"phase": None, "step": 0, "phases_done": state["phases_done"] + [phase]}

    if response_calibration:
        model.eval()
        model.merge_lora()
        _log(accelerator, describe(calibrate_response_threshold(model, response_calibration), response_calibration))
    if accelerator.is_main_process:
        if baseline:
            _atomic_save(final, lambda tmp: save_plain(model, tmp, config.method))
        else:
            _atomic_save(final, lambda tmp: model.save_pretrained(tmp))
    accelerator.wait_for_everyone()
    _log(accelerator, f"saved the {'plain ' + config.method if baseline else 'ESS'} model to {final}")
    return final


def _log(accelerator, message: str) -> None:
    """Log on the main process only (every process runs the same steps)."""
    if accelerator.is_main_process:
        logger.info(message)


def _check_same_run(out: Path, config: TrainConfig, base: str, accelerator) -> None:
    settings = {"base": base, **dataclasses.asdict(config)}
    settings.pop("out")
    path = out / "train_config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        saved.setdefault("method", "ess")  # runs from before --method
        saved.setdefault("pack", settings["pack"])  # runs from before --pack: the layout changes no loss
        changed = sorted(k for k in settings if saved.get(k) != settings[k])
        if changed:
            raise TrainingError(
                f"{out} holds a run with other settings ({', '.join(changed)} differ); "
                "rerun with the same flags to resume, or choose another --out"
            )
    elif accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")
    accelerator.wait_for_everyone()


ANSWER_START_TOKENS = Policy.r1
"""Answer tokens of an answer-start row: what a rule-1 re-evaluation reads with the default policy."""


def _phase_items(
    phase: str, config: TrainConfig, model: ESSModel, encoder: ChatEncoder, examples: list, pretrain_examples: list
) -> tuple[list[Encoded], list[Encoded]]:
    """(items, replay items) of a phase: `examples` make the alignment mixture, `pretrain_examples`
    the pretraining-phase windows. Replay items (alignment phase only) are those windows without LM
    targets."""
    base = model.config.base_model
    if is_baseline(config.method):
        items = baseline_items(
            config.method, examples, base, encoder, config.examples, config.seed, config.refusal_resamples
        )
        return items, []
    replay = phase == Phase.ALIGN and config.replay_every > 0
    windows = []
    if phase == Phase.PRETRAIN or replay:
        answered = augment_examples(pretrain_examples, config.augment, config.augment_answers, config.seed)
        windows = pretraining_texts(
            pretrain_examples, base, model.tokenizer, config.windows_per_answer, config.seed, answered
        )
    if phase == Phase.PRETRAIN:
        return [encoder.encode_text(text, label, lm_loss=label == "benign") for text, label in windows], []
    mixture = alignment_examples(examples, base, config.examples, config.seed, config.refusal_resamples)
    replay_items = [encoder.encode_text(text, label, lm_loss=False) for text, label in windows]
    # Attack-shaped variants: [CLS] + query only, no LM targets, so they carry the [CLS] loss alone.
    variants = augment_examples(mixture, config.augment, config.augment_rate, config.seed)
    items = [encoder.encode_example(example) for example in mixture]
    items += [encoder.encode_query(v.query, LABELS.index(v.label)) for v in variants]
    for example in answer_starts(mixture, base, config.answer_start_rows, config.seed):
        start = encoder.response_ids(example.query, example.response)[0][:ANSWER_START_TOKENS]
        items.append(encoder.encode_answer_start(example.query, start, LABELS.index(example.label)))
    return items, replay_items


def _response_calibration(config: TrainConfig) -> CalibrationConfig | None:
    """The response-threshold calibration of the run, its prompts read now: a bad file or rate fails
    before any training."""
    if not config.response_calibration:
        return None
    try:
        calibration = CalibrationConfig(
            prompts=config.response_calibration, max_late_stop_rate=config.max_late_stop_rate
        )
    except CalibrationError as error:
        raise TrainingError(str(error)) from None
    load_examples(calibration.prompts, label="benign")
    return calibration


def _run_phase(
    phase, items, replay_items, model, encoder, config, accelerator, out, start, optimizer_state, phases_done
) -> None:
    world, rank = accelerator.num_processes, accelerator.process_index
    batch_size = config.pretrain_batch_size if phase == Phase.PRETRAIN else config.batch_size
    per_step = batch_size * world
    epochs = config.pretrain_epochs if phase == Phase.PRETRAIN else config.epochs
    schedule = Schedule(
        [len(i.ids) for i in items],
        [len(i.ids) for i in replay_items],
        per_step,
        config,
        epochs,
        config.seed + len(phases_done),
        grouped=config.group_by_length == "both" or (config.group_by_length == "pretrain" and phase == Phase.PRETRAIN),
    )
    total = schedule.total
    lambda_align = config.lambda_cls if config.lambda_cls is not None else model.config.lambda_align

    head_params = [model.cls_embedding, *model.head.parameters()]
    head_ids = {id(p) for p in head_params}
    lm_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": lm_params, "lr": config.peak_lr}, {"params": head_params, "lr": config.head_lr}],
        weight_decay=config.weight_decay,
    )
    peak = [group["lr"] for group in optimizer.param_groups]
    if optimizer_state is not None:
        optimizer.load_state_dict(_read_optimizer(optimizer_state))
    ddp_model, optimizer = accelerator.prepare(model, optimizer)

    replay_note = (
        f", a replay step on {len(replay_items)} windows after every {schedule.every}" if schedule.every else ""
    )
    _log(accelerator, f"{phase} phase: {len(items)} sequences{replay_note}, {total} steps of {per_step}")
    bar = tqdm(total=total, initial=start, desc=phase, unit="step", disable=not accelerator.is_local_main_process)
    log = (out / "train_log.jsonl").open("a") if accelerator.is_main_process else None
    packed = config.pack and not is_baseline(config.method)  # a baseline's sequences have no [CLS] to open them
    share_prefix = not model.has_dropout()  # each sequence draws its own dropout masks
    row_length = min(n for n in (config.max_length, model.context_limit[0]) if n is not None)
    step, started, tokens = start, time.time(), 0
    interrupted = _InterruptFlag()
    try:
        for step in range(start, total):
            replay, rows = schedule.rows(step, rank, batch_size)
            source, step_phase = (replay_items, Phase.PRETRAIN) if replay else (items, phase)
            sequences = [source[i] for i in rows]
            if packed:
                batch = encoder.pack(sequences, row_length, share_prefix)
            else:
                batch = encoder.collate(sequences)
            batch = batch.to(accelerator.device)
            factor = lr_factor(step, total, config.warmup_ratio)
            for group, lr in zip(optimizer.param_groups, peak):
                group["lr"] = lr * factor
            weight = lambda_align if replay else config.lambda_cls
            if is_baseline(config.method):
                weight = 0.0  # no [CLS]: the head reads a text token and is not trained
            output = ddp_model(
                batch.input_ids,
                batch.roles,
                step_phase,
                batch.lm_targets,
                batch.cls_labels,
                weight,
                segments=batch.segments,
            )
            accelerator.backward(output.loss)
            accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            accuracy = (output.cls_logits.argmax(-1) == batch.cls_labels).float().mean()
            metrics = torch.stack([output.loss.detach(), output.lm_loss.detach(), output.cls_loss.detach(), accuracy])
            loss, lm_loss, cls_loss, acc = accelerator.reduce(metrics, reduction="mean").tolist()
            tokens += sum(len(sequence.ids) for sequence in sequences) * world
            rate = tokens / max(1e-9, time.time() - started)
            bar.set_postfix(loss=f"{loss:.3f}", cls=f"{cls_loss:.3f}", acc=f"{acc:.2f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if log:
                row = {
                    "phase": phase,
                    "step": step + 1,
                    "replay": replay,
                    "loss": loss,
                    "lm_loss": lm_loss,
                    "cls_loss": cls_loss,
                    "cls_acc": acc,
                    "lr": optimizer.param_groups[0]["lr"],
                    "tokens_per_s": rate,
                }
                log.write(json.dumps(row) + "\n")
                log.flush()
            if (step + 1) % config.save_every == 0 or step + 1 == total or interrupted:
                _save_checkpoint(out, model, optimizer, phase, step + 1, phases_done, accelerator)
            if interrupted:
                raise KeyboardInterrupt
    finally:
        interrupted.restore()
        bar.close()
        if log:
            log.close()


class _InterruptFlag:
    """Turns Ctrl-C / SIGTERM into 'finish this step, checkpoint, then stop' on one process."""

    def __init__(self):
        self.set = False
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for sig in self._previous:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.set:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.set = True

    def __bool__(self) -> bool:
        return self.set

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _atomic_save(target: Path, write) -> None:
    """Write a folder next to `target`, then rename it into place: never half a checkpoint."""
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _save_checkpoint(out: Path, model, optimizer, phase: str, step: int, phases_done: list[str], accelerator) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder = out / "checkpoints"
        name = f"{phase}-{step:06d}"

        def write(tmp: Path) -> None:
            accelerator.unwrap_model(model).save_pretrained(tmp / "model")
            tensors, groups = _flatten_optimizer(optimizer.state_dict())
            save_file(tensors, tmp / "optimizer.safetensors")
            state = {"phase": phase, "step": step, "phases_done": phases_done, "param_groups": groups}
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")

        _atomic_save(folder / name, write)
        latest = folder / ".latest.tmp"
        latest.write_text(name + "\n")
        os.replace(latest, folder / "latest")
        for old in folder.iterdir():
            if old.is_dir() and old.name != name and not old.name.startswith("."):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    folder = out / "checkpoints" / pointer.read_text().strip()
    return folder if (folder / "state.json").exists() else None


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {
        f"{index}.{key}": (value if torch.is_tensor(value) else torch.tensor(value)).detach().contiguous().cpu()
        for index, slots in state_dict["state"].items()
        for key, value in slots.items()
    }
    return tensors, state_dict["param_groups"]


def _read_optimizer(path: Path) -> dict:
    tensors = load_file(path)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = json.loads((path.parent / "state.json").read_text())["param_groups"]
    return {"state": state, "param_groups": groups}
