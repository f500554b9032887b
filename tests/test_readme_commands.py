"""Every `python run.py ...` command in README.md, as a user types it.

Commands that run on a CPU without downloads run in a copy of the repository (tests.helpers.cli.Workspace, its own
data/), from its root, through a shell-free `python run.py ARGS`, with only shrinking overrides appended (epochs,
batch limits, image counts and sizes). The files the README names (`path/to/folder`, `photo.jpg`, ...) are made in
that copy; `<time>` and `...` in a path are the run dir that the README command before it (`after`) printed.
Commands that need a GPU, downloaded weights or a real data set are composed with Hydra's compose API, their sweeps
expanded, every interpolation resolved and the trainer resolved for a faked machine with 8 bf16 GPUs. A command the
README shows failing (a config with bad settings) runs as typed and must print the lines the README shows. A README
command missing from COMMANDS, or an entry of COMMANDS the README does not show, fails
`test_every_readme_command_is_covered`.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import OmegaConf, read_write
from PIL import Image

from framework.hardware import resolve_trainer
from framework.loggers import has_events
from tests.helpers.cli import Workspace
from tests.helpers.config import CONF, ROOT, fake_gpus
from tests.helpers.tiny_vlms import save_tiny_git


@dataclass(frozen=True)
class Run:
    """Run on the CPU: `shrink` is appended; `after` is the README command whose run dir fills `<time>` / `...`."""

    shrink: tuple[str, ...] = ()
    after: str | None = None


@dataclass(frozen=True)
class Compose:
    """Only composed and resolved: `needs` says why it cannot run here (a GPU, weights, a data set)."""

    needs: str


@dataclass(frozen=True)
class Refused:
    """Run as typed, it stops before anything runs: exit code 1, the README's `config error` lines (each one line of
    what it prints), no run dir."""

    lines: tuple[str, ...]


CAPTION_DATA = ("data.num_train=64", "data.num_val=16", "data.num_test=16")
ONE_EPOCH = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
)
SHAPES = (*ONE_EPOCH, *CAPTION_DATA, "data.batch_size=16")
EXPLAIN = ("data.num_train=64", "data.num_val=16", "data.num_test=64", "data.num_predict=4")
CAPTION_EXPLAIN = (
    *CAPTION_DATA,
    "data.num_predict=2",
    "model.ig_steps=4",
    "model.deletion_steps=2",
    "model.randomisation=false",
)
STYLE = ("data.iterations=3", "data.image_size=96")
DEFAULT = ""  # `python run.py`

COMMANDS: dict[str, Run | Compose | Refused] = {
    # Running tasks, captioning
    DEFAULT: Run(SHAPES),
    "model.beam_size=0 model.decoder.rnn=lstn data.skip_bad_images=yes +data.batch_sise=8 --cfg job": Refused(
        (
            "config error: data.skip_bad_images=yes: takes true or false",
            "config error: data.batch_sise is not a setting of datamodules.captions.ShapesDataModule (did you mean "
            "data.batch_size?)",
            "config error: model.decoder.rnn=lstn: takes one of lstm, gru",
            "config error: model.beam_size=0: takes a whole number >= 1",
        )
    ),
    "task=shapes_captioning": Run(SHAPES),
    "mode=eval ckpt_path=outputs/shapes_captioning/runs/<time>/checkpoints/last.ckpt": Run(
        ("trainer.limit_test_batches=1", *CAPTION_DATA), after=DEFAULT
    ),
    "mode=predict ckpt_path=.../last.ckpt data.images=path/to/folder": Run(CAPTION_DATA, after=DEFAULT),
    "ckpt_path=.../last.ckpt trainer.max_epochs=20": Run((*SHAPES, "trainer.max_epochs=2"), after=DEFAULT),
    "-m seed=1,2,3 model.decoder.rnn=lstm,gru": Run(SHAPES),
    "-m hparams_search=shapes_optuna hydra.sweeper.n_trials=20": Run((*SHAPES, "hydra.sweeper.n_trials=2")),
    "debug=fdr": Run(CAPTION_DATA),
    "task=shapes_captioning data=caption_folder data.source.folder=path/to/folder": Run(ONE_EPOCH),
    "experiment=shapes_scst": Run(SHAPES),
    "experiment=shapes_scst ckpt_path=outputs/shapes_captioning/runs/<time>/checkpoints/last.ckpt": Run(
        (*SHAPES, "trainer.max_epochs=2"), after=DEFAULT
    ),
    "trainer=cpu": Run(SHAPES),
    "-m trainer=ddp_sim seed=1,2": Run(SHAPES),
    "-m hydra/launcher=submitit_local trainer=ddp_sim seed=1,2": Run(SHAPES),
    "trainer.devices=4": Compose("4 GPUs"),
    "task=blip_coco trainer.devices=4": Compose("BLIP weights, COCO, 4 GPUs"),
    "trainer=gpu trainer.precision=bf16-mixed": Compose("a GPU"),
    "trainer=ddp trainer.devices=4": Compose("4 GPUs"),
    "trainer=ddp trainer.devices=4 trainer.precision=bf16-mixed": Compose("4 GPUs"),
    "task=blip_coco trainer=fsdp trainer.devices=4": Compose("BLIP weights, COCO, 4 GPUs"),
    "task=blip_shapes trainer=fsdp_sim": Compose("BLIP weights (tests/test_fsdp.py runs it with a tiny BLIP)"),
    "task=sdxl_dreambooth trainer=fsdp trainer.devices=2 data.source.folder=path/to/dog": Compose(
        "SDXL weights, 2 GPUs (tests/test_fsdp.py runs it on 2 CPU processes with a tiny SDXL)"
    ),
    "task=blip_coco mode=export ckpt_path=outputs/blip_coco/runs/<time>/checkpoints/last.ckpt": Compose(
        "BLIP weights and a trainer=fsdp run"
    ),
    "-m hydra/launcher=submitit_slurm task=shapes_captioning trainer=ddp trainer.devices=4 trainer.num_nodes=2 "
    "hydra.launcher.partition=gpu": Compose("a SLURM cluster"),
    "... resume=auto": Compose("a run to resume (any command plus resume=auto)"),
    "task=cnn_rnn_coco trainer=gpu": Compose("COCO and ImageNet ResNet-50 weights, a GPU"),
    "task=cnn_rnn_coco data=coco trainer=gpu": Compose("COCO and ImageNet ResNet-50 weights, a GPU"),
    "task=cnn_rnn_flickr8k trainer=gpu": Compose("Flickr8k and ImageNet ResNet-50 weights, a GPU"),
    "task=cnn_rnn_flickr8k data=flickr8k_karpathy trainer=gpu": Compose("Flickr8k and ResNet-50 weights, a GPU"),
    # Any Hugging Face captioner: a save_pretrained folder (a tiny GIT, made by make_user_files) runs here
    "task=hf_captioner_shapes model.pretrained=path/to/a/save_pretrained/folder": Run(SHAPES),
    "task=hf_captioner_coco model.pretrained=Qwen/Qwen2-VL-2B-Instruct model.lora.rank=16 trainer=gpu "
    "trainer.precision=bf16-mixed": Compose("Qwen2-VL weights, COCO, a GPU"),
    "task=hf_captioner_coco model.pretrained=Salesforce/blip-image-captioning-base trainer=gpu": Compose(
        "BLIP weights, COCO, a GPU"
    ),
    "task=hf_captioner_coco model.pretrained=nlpconnect/vit-gpt2-image-captioning trainer=gpu": Compose(
        "ViT-GPT2 weights, COCO, a GPU"
    ),
    "task=hf_captioner_coco model.pretrained=microsoft/git-base-coco trainer=gpu": Compose("GIT weights, COCO, a GPU"),
    "task=hf_captioner_coco model.pretrained=Salesforce/blip2-opt-2.7b model.lora.rank=16 model.quantize=4bit "
    "trainer=gpu": Compose("BLIP-2 weights, COCO, a GPU"),
    "task=hf_captioner_coco model.pretrained=google/paligemma-3b-pt-224 model.lora.rank=16 trainer=gpu "
    "trainer.precision=bf16-mixed": Compose("PaliGemma weights, COCO, a GPU"),
    "task=hf_captioner_coco model.pretrained=florence-community/Florence-2-base trainer=gpu": Compose(
        "Florence-2 weights, COCO, a GPU"
    ),
    # BLIP and ViT-GPT2: pretrained weights from the hub and COCO
    "task=blip_coco mode=export ckpt_path=.../last.ckpt": Compose("BLIP weights"),
    "task=blip_coco mode=export ckpt_path=outputs/blip_coco/runs/<time>/checkpoints/epoch_004.ckpt": Compose(
        "BLIP weights"
    ),
    "task=blip_coco mode=export": Compose("BLIP weights"),
    "task=blip_coco mode=eval trainer=gpu trainer.precision=bf16-mixed": Compose("BLIP weights, COCO, a GPU"),
    "task=blip_coco mode=predict ckpt_path=.../last.ckpt data.images=path/to/folder": Compose("BLIP weights"),
    "task=blip_coco mode=eval ckpt_path=.../last.ckpt model.generation.num_beams=5": Compose("BLIP weights, COCO"),
    "experiment=blip_coco_paper": Compose("BLIP weights, COCO, GPUs"),
    "experiment=blip_coco_paper trainer.devices=4 trainer.accumulate_grad_batches=2": Compose("BLIP, COCO, 4 GPUs"),
    "-m task=blip_coco hparams_search=blip_optuna": Compose("BLIP weights, COCO, GPUs"),
    "task=vit_gpt2_coco trainer=gpu trainer.precision=bf16-mixed": Compose("ViT-GPT2 weights, COCO, a GPU"),
    "task=vit_gpt2_coco model.pretrained=null model.encoder_pretrained=google/vit-base-patch16-224-in21k "
    "model.decoder_pretrained=openai-community/gpt2 model.optimizer.lr=1e-4 trainer=gpu": Compose(
        "ViT and GPT-2 weights, COCO, a GPU"
    ),
    # SDXL DreamBooth: SDXL weights and a GPU
    "task=sdxl_dreambooth trainer=gpu data.source.folder=path/to/dog": Compose("SDXL weights, a GPU"),
    "experiment=sdxl_dreambooth_prior trainer=gpu data.source.folder=path/to/dog": Compose("SDXL weights, a GPU"),
    "experiment=sdxl_fast trainer=gpu data.source.folder=path/to/dog": Compose("SDXL weights, a GPU"),
    "task=sdxl_dreambooth trainer=gpu data.source.folder=path/to/dog data.buckets=true": Compose("SDXL weights, a GPU"),
    "experiment=sdxl_prodigy trainer=gpu data.source.folder=path/to/dog": Compose("SDXL weights, a GPU"),
    "task=sdxl_lora_3d_icons trainer=gpu data.source.folder=path/to/3d_icon": Compose("SDXL weights, a GPU"),
    "mode=predict task=sdxl_dreambooth trainer=gpu ckpt_path=outputs/sdxl_dreambooth/runs/<time>/checkpoints/"
    'last.ckpt data.prompts=["a photo of sks dog on the moon","a sks dog in a bucket"] model.fuse_lora=true': Compose(
        "SDXL weights, a GPU"
    ),
    "mode=predict task=sdxl_dreambooth trainer=gpu model.lora_weights="
    "outputs/sdxl_dreambooth/runs/<time>/export": Compose("SDXL weights, a GPU"),
    "mode=eval task=sdxl_dreambooth trainer=gpu ckpt_path=.../last.ckpt data.test_prompts=prompts.txt": Compose(
        "SDXL, CLIP and DINO weights, a GPU"
    ),
    "mode=eval task=sdxl_dreambooth trainer=gpu data.test_prompts=prompts.txt": Compose("SDXL weights, a GPU"),
    "mode=export task=sdxl_dreambooth ckpt_path=...": Compose("SDXL weights"),
    "-m task=sdxl_dreambooth hparams_search=sdxl_fidelity trainer=gpu data.source.folder=path/to/dog": Compose(
        "SDXL, CLIP and DINO weights, a GPU (tests/test_dreambooth.py runs the sweep with a tiny SDXL)"
    ),
    # Explaining classifiers
    "task=shapes_classifier": Run((*ONE_EPOCH, *EXPLAIN)),
    "task=saliency": Run(EXPLAIN),
    "task=saliency model.pointing_tolerance=0": Run(EXPLAIN),
    "task=saliency model.contact_sheet_images=8": Run(EXPLAIN),
    "task=adversarial": Run(EXPLAIN),
    "task=adversarial model.attack=fgsm": Run(EXPLAIN),
    "task=adversarial model.attack=fooling": Run(EXPLAIN),
    "task=class_visualisation": Run(("model.steps=5",)),
    "task=saliency model.classifier.name=resnet50 data=explain_images data.images=path/to/photos trainer=gpu": Compose(
        "ImageNet ResNet-50 weights, a GPU"
    ),
    "task=adversarial model.classifier.name=resnet50 data=explain_images data.images=path/to/photos "
    "model.target=963": Compose("ImageNet ResNet-50 weights"),
    "task=class_visualisation model.classifier.name=resnet50 model.image_size=224 data.targets=[1,130,945]": Compose(
        "ImageNet ResNet-50 weights"
    ),
    # Explaining captioners
    "task=caption_explain model.captioner=outputs/shapes_captioning/runs/<time>/checkpoints/last.ckpt": Run(
        CAPTION_EXPLAIN, after=DEFAULT
    ),
    "task=caption_explain model.captioner=.../last.ckpt data.images=path/to/folder": Run(
        CAPTION_EXPLAIN, after=DEFAULT
    ),
    "task=caption_images model.captioner=.../last.ckpt data.images=path/to/folder model.trigger_token=sks": Run(
        after=DEFAULT
    ),
    # Style transfer (random VGG features where the ImageNet weights are not in the torch cache)
    "task=style_transfer": Run(STYLE),
    "task=style_transfer data.image_size=192 data.iterations=150 model.content_weight=20": Run(STYLE),
    "task=style_transfer data.content=photo.jpg data.style=painting.jpg data.image_size=512": Run(STYLE),
    "task=style_transfer data.style=[a.jpg,b.jpg] data.style_weights=[0.7,0.3]": Run(STYLE),
    "task=style_transfer model.preserve_color=luminance": Run(STYLE),
    "task=style_transfer data.content=photo.jpg data.style=[a.jpg,b.jpg] data.masks=path/to/masks": Run(STYLE),
    "task=style_transfer model.scales=[0.25,0.5,1.0] model.scale_shares=[1,1,3] data.image_size=1024": Run(
        ("data.iterations=3", "data.image_size=128")
    ),
    "task=style_transfer ~model.optimizer "
    "+model.optimizer={_target_: torch.optim.Adam, _partial_: true, lr: 0.02}": Run(STYLE),
    "task=fast_style": Run(("trainer.max_epochs=1", "data.image_size=64")),
    "task=fast_style mode=predict ckpt_path=outputs/fast_style/runs/<time>/checkpoints/last.ckpt "
    "data.images=path/to/photos data.max_size=1024": Run(("data.max_size=64",), after="task=fast_style"),
    "task=fast_style mode=export ckpt_path=.../last.ckpt": Run(after="task=fast_style"),
    "task=adain_style": Run(("trainer.max_epochs=1", "data.image_size=32")),
    "task=adain_style mode=predict ckpt_path=outputs/adain_style/runs/<time>/checkpoints/last.ckpt "
    "data.images=path/to/photos data.styles=painting.jpg": Run(after="task=adain_style"),
    "task=adain_style mode=predict ckpt_path=.../last.ckpt data.images=path/to/photos data.styles=[a.jpg,b.jpg] "
    "model.style_weights=[0.7,0.3] model.alpha=0.8 model.preserve_color=histogram": Run(after="task=adain_style"),
    "task=adain_style mode=predict ckpt_path=.../last.ckpt data.images=path/to/photos data.styles=[a.jpg,b.jpg] "
    "data.masks=path/to/masks": Run(after="task=adain_style"),
    "task=adain_style mode=export ckpt_path=.../last.ckpt": Run(after="task=adain_style"),
    "task=adain_style data.folder=data/coco/train2014 data.style_folder=data/wikiart trainer=gpu "
    "trainer.max_epochs=16 data.batch_size=8": Compose("COCO, WikiArt, a GPU"),
    "task=fast_style data.folder=data/coco/train2014 data.style=painting.jpg data.image_size=256 trainer=gpu "
    "trainer.max_epochs=2": Compose("COCO, a GPU"),
}


def readme_commands() -> dict[str, list[str]]:
    """The arguments after `python run.py` of every such command in README.md, as the shell splits them, by their
    space-joined text: lines of its code blocks (continuations joined, comments dropped) and inline code."""
    text = (ROOT / "README.md").read_text()
    lines = [
        line
        for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
        for line in block.replace("\\\n", " ").splitlines()
        if line.strip().startswith("python run.py")
    ]
    spans = re.findall(r"`(python run\.py[^`]*)`", text)
    commands = [shlex.split(command, comments=True)[2:] for command in lines + spans]
    return {" ".join(args): args for args in commands}


README = readme_commands()


def coverage_line() -> str:
    ran = sum(isinstance(spec, Run) for spec in COMMANDS.values())
    refused = sum(isinstance(spec, Refused) for spec in COMMANDS.values())
    composed = len(COMMANDS) - ran - refused
    return f"README commands: {len(COMMANDS)}: {ran} run as typed, {refused} refused as shown, {composed} composed"


def test_every_readme_command_is_covered():
    assert [c for c in README if c not in COMMANDS] == [], "README commands missing from COMMANDS: add them"
    assert [c for c in COMMANDS if c not in README] == [], "COMMANDS the README no longer shows: remove them"


# ----------------------------------------------------------------------------------------------- composed
@pytest.mark.parametrize("command", [c for c, spec in COMMANDS.items() if isinstance(spec, Compose)])
def test_command_composes_and_resolves(command, tmp_path):
    args = [arg.replace("<time>", "2026-11-30_12-00-00") for arg in README[command]]  # a run dir's name for <time>
    multirun = args[:1] == ["-m"]
    overrides = [a for a in args[multirun:] if a != "..."]
    if multirun:  # the jobs of the sweep, as Hydra's basic sweeper makes them
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    else:
        jobs = [overrides]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for number, job in enumerate(jobs):
            cfg = compose("config", overrides=job, return_hydra_config=True)
            with read_write(cfg.hydra):  # what Hydra sets when the job starts
                cfg.hydra.runtime.output_dir, cfg.hydra.job.num = str(tmp_path), number
            HydraConfig.instance().set_config(cfg)
            try:
                cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            finally:  # later in-process runs of this process are outside a Hydra run
                HydraConfig.instance().cfg = None
            with fake_gpus(8):
                resolve_trainer(cfg.trainer)
            assert get_class(cfg.model._target_) and get_class(cfg.data._target_)
            assert cfg.trainer.accelerator in ("gpu", "cpu") and cfg.trainer.precision != "auto"


# ---------------------------------------------------------------------------------------------------- run
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    """A copy of the repository (its tracked and unignored files, data/ of its own: the README's commands generate
    and train what they use) with the files the README's commands name."""
    copy = Workspace.copy(tmp_path_factory.mktemp("readme_repository"))
    make_user_files(copy.root)
    return copy


def make_user_files(root: Path) -> None:
    """A captioned folder (images + metadata.jsonl), a folder of photos, single photos and paintings, and a tiny
    Hugging Face captioner's save_pretrained folder."""
    rng = np.random.default_rng(0)

    def picture(path: Path, size=(80, 64)) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        smooth = rng.random((size[1] // 8, size[0] // 8, 3))
        Image.fromarray((smooth * 255).astype(np.uint8)).resize(size, Image.BICUBIC).save(path)

    captions = []
    for i in range(40):  # enough for the hash split to give val and test images
        picture(root / "path/to/folder" / f"{i}.jpg")
        colour = ["red", "green", "blue"][i % 3]
        captions.append({"file_name": f"{i}.jpg", "text": [f"a {colour} picture", f"some {colour} noise"]})
    (root / "path/to/folder/metadata.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    for i in range(3):
        picture(root / "path/to/photos" / f"photo_{i}.jpg", size=(96, 72))
    for name in ("photo.jpg", "painting.jpg", "a.jpg", "b.jpg"):
        picture(root / name, size=(96, 96))
    save_tiny_git(root / "path/to/a/save_pretrained/folder")  # a Hugging Face captioner (GIT)
    masks = root / "path/to/masks"  # white on the right half: where the (first) style goes
    masks.mkdir(parents=True)
    for name, size in [*((f"photo_{i}.png", (96, 72)) for i in range(3)), ("photo.png", (96, 96))]:
        Image.fromarray(np.tile(np.uint8([0, 255]).repeat(size[0] // 2), (size[1], 1))).save(masks / name)


class Runs:
    """Runs README commands in the workspace, each once, and remembers the dir each one printed."""

    def __init__(self, workspace: Workspace):
        self.workspace, self.dirs, self.printed = workspace, {}, {}

    def __call__(self, command: str) -> Path:
        if command not in self.dirs:
            spec = COMMANDS[command]
            args = README[command]
            if spec.after is not None:
                produced = self(spec.after)
                args = [
                    re.sub(r"outputs/\w+/runs/<time>", str(produced), arg).replace(".../", f"{produced}/checkpoints/")
                    for arg in args
                ]
            result = self.workspace.run([*args, *spec.shrink], check=False, timeout=900)
            assert result.returncode == 0, (
                f"python run.py {command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
            )
            printed = re.findall(r"^(?:run|sweep) dir: (.+)$", result.stdout, re.M)
            assert printed, f"python run.py {command} printed no run dir:\n{result.stdout[-2000:]}"
            assert result.run_dir == Path(printed[-1])
            self.dirs[command] = Path(printed[-1])
            self.printed[command] = result.stdout
        return self.dirs[command]


@pytest.fixture(scope="module")
def runs(workspace) -> Runs:
    return Runs(workspace)


def expected_jobs(args: list[str]) -> int:
    """Jobs a multirun makes: the product of the grid's choices, or the Optuna sweep's n_trials."""
    trials = [int(a.split("=", 1)[1]) for a in args if a.startswith("hydra.sweeper.n_trials=")]
    if trials:
        return trials[-1]
    return math.prod(len(a.split("=", 1)[1].split(",")) for a in args if "=" in a and "," in a.split("=", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, spec in COMMANDS.items() if isinstance(spec, Run)])
def test_command_runs_as_typed(command, runs, workspace):
    run_dir = runs(command)
    spec = COMMANDS[command]
    assert run_dir.is_relative_to(workspace.outputs), "runs go to the repository's outputs/"
    args = [*README[command], *spec.shrink]
    if args[0] == "-m":
        with open(run_dir / "summary.csv") as f:
            rows = f.read().splitlines()[1:]
        assert len(rows) == expected_jobs(args) and all(",ok," in row for row in rows)
        job_dirs = [run_dir / str(job) for job in range(len(rows))]
    else:
        job_dirs = [run_dir]
    if "debug=fdr" in args:  # under the task's folder, apart from its runs
        assert run_dir.parent == workspace.outputs / "shapes_captioning" / "debug"
    assert "INFO: GPU available" not in runs.printed[command]  # Lightning's lines once, not through its own handler
    for job_dir in job_dirs:
        metrics = json.loads((job_dir / "metrics.json").read_text())
        assert all(math.isfinite(value) for value in metrics.values()), metrics
        # The run's log ends with the summary it printed (a submitit job prints into its own log, not the console).
        summary = (job_dir / "run.log").read_text().rpartition("summary:")[2]
        assert f"run dir: {job_dir}" in summary
        assert ("review:  tensorboard --logdir" in summary) == has_events(job_dir)
        if metrics:  # the weights of each stage's figures
            provenance = json.loads((job_dir / "metrics_provenance.json").read_text())
            assert set(provenance) == {name.split("/", 1)[0] for name in metrics}
        else:
            assert "┏" not in summary  # no empty table
        config = OmegaConf.load(job_dir / "config.yaml")
        assert config.trainer.accelerator == "cpu" and config.trainer.precision != "auto"
        if "trainer=ddp_sim" in args:  # the job's second rank wrote into the job's own dir
            assert (job_dir / "run_rank_1.log").is_file(), sorted(p.name for p in job_dir.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, spec in COMMANDS.items() if isinstance(spec, Refused)])
def test_refused_command_prints_its_config_errors(command, workspace):
    result = workspace.run(README[command], check=False, full_error=False)
    assert result.returncode == 1, result.describe()
    printed = result.stderr.splitlines()
    assert [line for line in printed if line.startswith("config error: ")] == list(COMMANDS[command].lines), (
        result.describe()
    )
    assert "Traceback" not in result.output and result.created == [], result.describe()
