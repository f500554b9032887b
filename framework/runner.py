"""train / eval / predict / export from a composed config; every run dir ends with its config and metrics.json.

What a task's module may implement to take part (export, predictions, inference overrides, building without a
checkpoint) are the contracts of framework/contracts.py; what a module and its data take from each other is handed
over here (framework/preparation.py: `model_inputs` before the module is built, the `Preparation` callback at each
stage). Building a data module or a LightningModule only records its arguments; the work that writes files is
Lightning's `prepare_data` (docs/ARCHITECTURE.md, Construction, preparation, loading).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from framework.checkpoints import (
    AtomicCheckpointIO,
    check_checkpoint,
    is_sharded_checkpoint,
    load_module,
    read_checkpoint,
)
from framework.checks import check_config
from framework.config import flatten
from framework.contracts import (
    BuildsFromConfig,
    Exports,
    InferenceOverrides,
    SavesPredictions,
)
from framework.distributed import gather_objects
from framework.errors import UserError
from framework.files import atomic_write, locked_run_dir, write_json
from framework.fsdp import FSDP2Strategy
from framework.hardware import resolve_trainer
from framework.launch import isolated_job
from framework.loggers import (
    REVIEW_FLAGS,
    RUN_LOG,
    add_review_layout,
    has_events,
    log_final_metrics,
    review_url,
    share_console_logs,
)
from framework.manifest import ROOT, git_state, manifest
from framework.preparation import Preparation, model_inputs
from framework.prerequisites import provide_required_runs

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    """Run the configured mode; log failures with the run dir, then re-raise (multiruns must not fail silently).
    However it ends, the run dir gets status.json and manifest.json (`finish`).

    Returns `optimized_metric` from the final metrics, for sweepers.
    """
    output_dir = Path(cfg.paths.output_dir)
    share_console_logs()
    # One run per dir. The ranks a multi-process job starts write into its dir too: global rank 0 holds the lock.
    writer = rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"
    current = Run(cfg, output_dir)
    try:
        with locked_run_dir(output_dir) if writer else nullcontext():
            try:
                metrics = execute(current)
            finally:
                if writer:
                    finish(current, sys.exc_info()[1])
    except Exception as error:
        log.error("run failed (%s); run dir: %s", one_line(error), output_dir)
        raise
    value = metrics.get(cfg.get("optimized_metric") or "")
    return None if value is None or math.isnan(value) else value


@dataclass
class Run:
    cfg: DictConfig
    output_dir: Path
    datamodule: L.LightningDataModule | None = None  # once built: the data it read goes into the manifest


def execute(current: Run) -> dict[str, float]:
    cfg, output_dir = current.cfg, current.output_dir
    check_config(cfg)
    refuse_ignored_overrides(cfg, hydra.utils.get_class(cfg.model._target_))
    resolve_trainer(cfg.trainer)
    provide_required_runs(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    save_config(cfg, output_dir)
    with isolated_job():
        if cfg.mode == "train":
            metrics, sources = train(current)
        else:  # every figure from the weights given
            metrics = {"eval": evaluate, "predict": predict, "export": export}[cfg.mode](current)
            sources = dict.fromkeys(stages(metrics), given_weights(cfg, output_dir))
    if rank_zero_only.rank == 0:
        if sources:
            write_json(output_dir / "metrics_provenance.json", sources)
        write_json(output_dir / "metrics.json", metrics)
    print_summary(cfg, output_dir, metrics, sources)
    return metrics


def finish(current: Run, error: BaseException | None) -> None:
    """status.json (ok, failed with the error's line, or interrupted) and manifest.json, written when the run ends; a
    failure to write them (a full disk) is a warning: the run's own error is what counts."""
    if error is None:
        status = {"status": "ok"}
    elif isinstance(error, (KeyboardInterrupt, SystemExit)):
        # the signal that stopped it where callbacks/signals.py noted one, else the exception's name
        status = {"status": "interrupted", "error": "; ".join(getattr(error, "__notes__", [])) or type(error).__name__}
    else:
        status = {"status": "failed", "error": one_line(error)}
    paths = current.datamodule.data_paths() if hasattr(current.datamodule, "data_paths") else None
    key = weights_key(current.cfg)
    weights = [current.cfg.get("ckpt_path"), OmegaConf.select(current.cfg, key) if key else None]
    try:
        write_json(current.output_dir / "manifest.json", manifest(current.cfg, paths, weights))
        write_json(current.output_dir / "status.json", status)
    except (UserError, OSError) as failure:
        log.warning("could not record how the run ended: %s", failure)
    RUN_LOG.info("status: %s%s", status["status"], f": {status['error']}" if "error" in status else "")


def one_line(error: BaseException) -> str:
    """An error as one line: its type and its message's lines joined (a config error names several keys)."""
    return f"{type(error).__name__}: {' | '.join(str(error).splitlines())}"


def instantiate(config, **kwargs):
    """hydra.utils.instantiate, letting a UserError raised by the target through unwrapped."""
    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from None
        raise


def save_config(cfg: DictConfig, output_dir: Path) -> None:
    if rank_zero_only.rank == 0:
        resolved = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(output_dir / "config.yaml", lambda f: f.write(resolved))


def build_trainer(cfg: DictConfig, with_loggers: bool = True) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None] + [Preparation()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None] if with_loggers else []
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])
    for logger in trainer.loggers:
        logger.log_hyperparams(hyperparameters(cfg))
    add_review_layout(trainer, cfg.get("optimized_metric"))
    return trainer


def hyperparameters(cfg: DictConfig) -> dict:
    """The resolved config, flat, with the code's commit and whether the tree differed from it (TensorBoard HPARAMS)."""
    git = git_state(ROOT)
    return flatten(OmegaConf.to_container(cfg, resolve=True)) | {"git.commit": git["commit"], "git.dirty": git["dirty"]}


def build_datamodule(current: Run) -> L.LightningDataModule:
    current.datamodule = instantiate(current.cfg.data)
    return current.datamodule


def load_model(cfg: DictConfig, datamodule: L.LightningDataModule | None = None) -> L.LightningModule:
    """The checkpoint's model (inference settings such as the beam size may be overridden from cfg.model),
    or, without ckpt_path, the model cfg.model builds where the module allows it (`BuildsFromConfig`). A module that
    is never trained names the setting its weights come from in `weights_key` (an explaining module's model)."""
    module_class = hydra.utils.get_class(cfg.model._target_)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and (key := weights_key(cfg)):
        raise UserError(
            f"task={cfg.task_name} has no checkpoints of its own ({module_class.__name__} is not trained): leave "
            f"ckpt_path unset and give the model it uses as {key}=PATH"
        )
    if issubclass(module_class, BuildsFromConfig) and not ckpt_path:
        return instantiate(cfg.model, **model_inputs(module_class, datamodule))
    if not ckpt_path:
        raise UserError(f"mode={cfg.mode} needs ckpt_path=path/to/checkpoint.ckpt (e.g. a run's checkpoints/last.ckpt)")
    check_checkpoint(ckpt_path, module_class, cfg.task_name)
    names = module_class.inference_hparams if issubclass(module_class, InferenceOverrides) else ()
    overrides = {key: cfg.model[key] for key in names if key in cfg.model}
    return load_module(module_class, ckpt_path, **overrides)


def weights_key(cfg: DictConfig) -> str | None:
    """The setting a never-trained module takes its model's weights from (its class's `weights_key`), or None."""
    return getattr(hydra.utils.get_class(cfg.model._target_), "weights_key", None)


def typed_overrides() -> list[str]:
    """The keys the command line set (`model.beam_size` of `model.beam_size=3`); none outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [override.lstrip("+~").split("=", 1)[0] for override in HydraConfig.get().overrides.task]


def refuse_ignored_overrides(cfg: DictConfig, module_class: type) -> None:
    """A setting typed on the command line that this run would not use is an error, not a value recorded in
    config.yaml as if it had run: `model.*` settings other than the inference ones for a module loaded from a
    checkpoint (its hyperparameters are the checkpoint's), and data.image_size in predict and export where the module
    prepares its images itself (a checkpoint's training size, a Hugging Face image processor; in train and eval the
    size still makes the synthetic shapes images)."""
    typed = typed_overrides()
    from_checkpoint = bool(cfg.get("ckpt_path")) and cfg.mode != "train"
    problems = []
    if from_checkpoint:
        names = module_class.inference_hparams if issubclass(module_class, InferenceOverrides) else ()
        ignored = [key for key in typed if key.startswith("model.") and key.split(".")[1] not in names]
        if ignored:
            usable = f" (settings that apply: {', '.join(f'model.{name}' for name in names)})" if names else ""
            problems.append(
                f"{', '.join(ignored)}: not used in mode={cfg.mode} with ckpt_path, which rebuilds the model the "
                f"checkpoint holds{usable}: remove {'them' if len(ignored) > 1 else 'it'}"
            )
    if "data.image_size" in typed and hasattr(module_class, "image_transform") and cfg.mode in ("predict", "export"):
        problems.append(
            f"data.image_size: not used in mode={cfg.mode}, where {module_class.__name__} prepares the images as its "
            f"model needs them ({'the checkpoint' if from_checkpoint else 'its image processor'} decides the size): "
            "remove it"
        )
    if problems:
        raise UserError("\n".join(problems))


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    """`stage/name` metrics the run ended with (learning rates from LearningRateMonitor are left out)."""
    return {
        name: float(value) for name, value in sorted(trainer.callback_metrics.items()) if not name.startswith("lr-")
    }


def stages(metrics: dict[str, float]) -> list[str]:
    return sorted({name.split("/", 1)[0] for name in metrics})


def checkpoint_weights(path: str | os.PathLike, output_dir: Path, **more) -> dict:
    """Where figures come from: a checkpoint (its path in the run dir when it is there), its epoch and step."""
    saved, path = read_checkpoint(path, key=None), Path(path).resolve()
    if path.is_relative_to(output_dir.resolve()):
        path = path.relative_to(output_dir.resolve())
    return {"checkpoint": str(path), "epoch": saved.get("epoch"), "global_step": saved.get("global_step"), **more}


def given_weights(cfg: DictConfig, output_dir: Path) -> dict:
    """eval/predict/export: the checkpoint ckpt_path names, or none (the module built from cfg.model; the weights its
    `weights_key` names)."""
    path = cfg.get("ckpt_path")
    if not path:
        key = weights_key(cfg)
        return {"checkpoint": None, "weights": f"{key}={OmegaConf.select(cfg, key)}" if key else "built from cfg.model"}
    return checkpoint_weights(path, output_dir)


def fitted_weights(trainer: L.Trainer, output_dir: Path) -> dict:
    """The weights training ended with: last.ckpt where the run saves it (callbacks last_checkpoint)."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        return checkpoint_weights(last, output_dir)
    return {"checkpoint": None, "weights": "the end of training, not saved", "global_step": trainer.global_step}


def resume_from(cfg: DictConfig, output_dir: Path, trainer: L.Trainer) -> str | None:
    """ckpt_path, or with resume=auto this run dir's last.ckpt (saved every epoch and when a signal stops the run; a
    folder under trainer=fsdp), checked to be a checkpoint of this task that `trainer` can resume. The run dir is the
    one resume=auto chose (framework/resume.py), or hydra.run.dir."""
    resume = cfg.get("resume")
    last = output_dir / "checkpoints" / "last.ckpt"
    path = cfg.get("ckpt_path")
    if resume == "auto" and not path:
        if last.exists():
            log.info("resume=auto: continuing from %s", last)
            path = str(last)
        else:
            log.info("resume=auto: no unfinished run with these overrides, starting fresh in %s", output_dir)
    if path:
        check_checkpoint(path, hydra.utils.get_class(cfg.model._target_), cfg.task_name)
        if is_sharded_checkpoint(path) and not isinstance(trainer.strategy, FSDP2Strategy):
            raise UserError(
                f"checkpoint {path} is sharded (written by trainer=fsdp): resume it with trainer=fsdp or fsdp_sim, on "
                f"any number of processes (or give mode=export ckpt_path={path} for its weights)"
            )
    return path


def best_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback whose best checkpoint the test after training uses: the first that monitors a
    validation metric (the task's, or one a module adds, e.g. DreamBooth's val/fidelity), else the first."""
    monitoring = [c for c in trainer.checkpoint_callbacks if (c.monitor or "").startswith("val/")]
    return monitoring[0] if monitoring else trainer.checkpoint_callback


def train(current: Run) -> tuple[dict[str, float], dict[str, dict]]:
    """Fit; then, where the task has a test stage, test the best checkpoint; then export it where the task can.

    Returns the final metrics and, for each stage, the weights its figures come from: train/* and val/* from the
    last ones, test/* from the best checkpoint.
    """
    cfg, output_dir = current.cfg, current.output_dir
    datamodule = build_datamodule(current)
    model = instantiate(cfg.model, **model_inputs(hydra.utils.get_class(cfg.model._target_), datamodule))
    trainer = build_trainer(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from(cfg, output_dir, trainer), weights_only=True)
    metrics = final_metrics(trainer)
    sources = dict.fromkeys(stages(metrics), fitted_weights(trainer, output_dir))
    if trainer.interrupted:
        return metrics, sources
    if is_overridden("test_step", model) and is_overridden("test_dataloader", datamodule):
        checkpoint = best_checkpoint_callback(trainer)
        best = checkpoint.best_model_path if checkpoint else ""
        if not best:
            log.warning("no best checkpoint (no checkpoint callback or no validation): testing the last weights")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics |= final_metrics(trainer)
        if best:
            score = checkpoint.best_model_score
            sources["test"] = checkpoint_weights(
                best, output_dir, monitor=checkpoint.monitor, score=None if score is None else float(score)
            )
        else:
            sources["test"] = fitted_weights(trainer, output_dir)
    if isinstance(model, Exports) and cfg.get("export_after_train", True):
        # Sharded weights are gathered by every rank; the export is written by rank 0 alone.
        if trainer.is_global_zero or isinstance(trainer.strategy, FSDP2Strategy):
            path = model.export(output_dir / "export")
            if trainer.is_global_zero:
                log.info("exported to %s", path)
    log_final_metrics(trainer, hyperparameters(cfg), metrics)
    return metrics, sources


def evaluate(current: Run) -> dict[str, float]:
    cfg = current.cfg
    datamodule = build_datamodule(current)
    model = load_model(cfg, datamodule)
    trainer = build_trainer(cfg)
    trainer.test(model, datamodule=datamodule)
    metrics = final_metrics(trainer)
    log_final_metrics(trainer, hyperparameters(cfg), metrics)
    return metrics


def predict(current: Run) -> dict[str, float]:
    cfg, output_dir = current.cfg, current.output_dir
    datamodule = build_datamodule(current)
    model = load_model(cfg, datamodule)
    trainer = build_trainer(cfg, with_loggers=False)
    batches = trainer.predict(model, datamodule=datamodule)
    # Every rank's rows, once per image (DistributedSampler pads with repeated images), in path order.
    unique = {row["image"]: row for part in gather_objects(batches) for batch in part for row in batch}
    rows = [unique[image] for image in sorted(unique)]
    if not trainer.is_global_zero:
        return {}
    return (model.save_predictions if isinstance(model, SavesPredictions) else save_predictions)(rows, output_dir)


def save_predictions(rows: list[dict], output_dir: Path) -> dict[str, float]:
    write_json(output_dir / "predictions.json", rows)
    atomic_write(output_dir / "predictions.csv", lambda f: write_csv(f, rows))
    log.info("wrote %d predictions to %s", len(rows), output_dir / "predictions.json")
    return {"predict/images": float(len(rows))}


def export(current: Run) -> dict[str, float]:
    cfg, output_dir = current.cfg, current.output_dir
    model = load_model(cfg, build_datamodule(current))
    if not isinstance(model, Exports):
        raise UserError(f"task_name={cfg.task_name}: {type(model).__name__} has no export format (mode=export)")
    log.info("exported to %s", model.export(output_dir / "export"))
    return {}


def write_csv(file, rows: list[dict]) -> None:
    writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else ["image", "caption"])
    writer.writeheader()
    writer.writerows(rows)


@rank_zero_only
def print_summary(cfg: DictConfig, output_dir: Path, metrics: dict[str, float], sources: dict[str, dict]) -> None:
    """The final metrics and the weights they come from, the run dir and, where the run wrote event files, the
    command that shows them; on the console and in the run's log."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True, record=True)  # soft_wrap: long paths stay on one line, ready to copy
    if metrics:
        table = Table(title=f"{cfg.task_name}: mode={cfg.mode}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in metrics.items():
            table.add_row(name, f"{value:.4f}")
        console.print(table)
    for where in {str(record): record for record in sources.values()}.values():
        named = ", ".join(f"{stage}/*" for stage, record in sources.items() if record == where)
        console.print(f"{named} from {describe_weights(where)}")
    console.print(f"run dir: {output_dir}")
    if has_events(output_dir):
        console.print(f"review:  tensorboard --logdir {output_dir} {REVIEW_FLAGS}")
        console.print(f"then:    {review_url(metrics, cfg.get('optimized_metric'))}")
    RUN_LOG.info("summary:\n%s", console.export_text().rstrip())


def describe_weights(record: dict) -> str:
    """'checkpoints/epoch_003.ckpt (epoch 3, step 40, best val/CIDEr 1.2345)', from a metrics_provenance.json entry."""
    where = record["checkpoint"] or f"the weights {record['weights']}"
    known = [f"{key.replace('global_', '')} {record[key]}" for key in ("epoch", "global_step") if key in record]
    if record.get("score") is not None:
        known.append(f"best {record['monitor']} {record['score']:.4f}")
    return f"{where} ({', '.join(known)})" if known else where
