"""DreamBooth / style LoRA for Stable Diffusion XL, as diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py
trains it, in a LightningModule.

- The base model (UNet, VAE, both CLIP text encoders and tokenizers, DDPM noise scheduler) comes from
  `pretrained`, an optional separate `vae` replaces the pipeline's. All of it is frozen; peft LoRA adapters
  on the UNet attention projections (and, with `train_text_encoder`, on both text encoders, with their
  own learning rate) are what trains. Under bf16/fp16 mixed precision the frozen UNet and text-encoder weights
  are cast to that dtype, the adapters stay fp32; the VAE runs in fp32 (`vae_fp32`), or in the 16-bit dtype where
  it is safe there (`vae_dtype`: under fp16 only a VAE made for it, such as madebyollin/sdxl-vae-fp16-fix).
- Guards: generated images with NaN, or a validation/test prompt whose images are all black, stop the run with
  the step; after training the optimizer state and cached memory are freed before the test pass.
- Loss: MSE to the noise (or the velocity, as the scheduler's prediction_type says), min-SNR weighting
  (`snr_gamma`), `noise_offset`, and with class examples in the batch prior preservation
  (`prior_loss_weight`); SDXL micro-conditioning from each image's original size, crop and target size
  (the resolution square, or with data.buckets the image's aspect-ratio bucket).
- Speed: frozen text encoders -> each prompt is encoded once (`cache_prompt_embeddings`); the data
  module's latent cache (data.cache_latents) is filled by `encode_latent_parameters` at fit start.
- Validation / test / predict generate images for prompts with fixed seeds; validation and test score
  them (CLIP-T, CLIP-I, DINO: fidelity.py). Checkpoints hold only the adapters (megabytes, not gigabytes).
- `export` writes pytorch_lora_weights.safetensors (diffusers layout; optionally Kohya) and a model card.
  Without ckpt_path, eval/predict use the base model plus an exported LoRA folder (`lora_weights`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from pathlib import Path

import diffusers
import hydra
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import cast_training_params, compute_snr
from lightning.pytorch.strategies import FSDPStrategy
from peft import LoraConfig, inject_adapter_in_model

from datamodules.dreambooth import prompt_slug
from framework.config import to_plain
from framework.distributed import gather_objects
from framework.errors import UserError
from framework.files import atomic_dir, atomic_write, write_json
from lightning_modules.generation.fidelity import Fidelity
from lightning_modules.generation.sdxl import (
    TEXT_ENCODERS,
    encode_prompts,
    load_sdxl,
    save_lora,
    set_lora_enabled,
    time_ids,
)

log = logging.getLogger(__name__)

LORA_DEFAULTS = {
    "rank": 4,
    "alpha": None,
    "dropout": 0.0,
    "use_dora": False,
    "target_modules": ["to_k", "to_q", "to_v", "to_out.0"],
}
TEXT_ENCODER_DEFAULTS = {
    "lr": 5.0e-6,
    "weight_decay": 1.0e-3,
    "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
INFERENCE_DEFAULTS = {"scheduler": None, "num_inference_steps": 25, "guidance_scale": 5.0}
MIXED_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
GENERATION_HINT = (
    "the run stopped. Under trainer.precision=16-mixed set model.vae_fp32=true (or an fp16-fixed model.vae); "
    "otherwise training diverged: lower model.optimizer.lr or set trainer.gradient_clip_val"
)
TEXT_ENCODER_DORA = (
    "diffusers 0.42's load_lora_weights (with transformers 5) drops the text encoders' DoRA magnitudes, so the "
    "exported LoRA would draw other images than the trained model"
)


class DreamBoothLoRA(L.LightningModule):
    builds_from_config = True
    inference_hparams = ("inference", "fidelity", "lora_weights", "fuse_lora", "lora_scale", "kohya")

    def __init__(
        self,
        pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0",
        vae: str | None = None,
        vae_fp32: bool = True,
        resolution: int = 1024,
        lora: dict | None = None,
        train_text_encoder: bool = False,
        text_encoder: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        use_8bit_adam: bool = False,
        prediction_type: str | None = None,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        prior_loss_weight: float = 1.0,
        gradient_checkpointing: bool = False,
        cache_prompt_embeddings: bool = True,
        inference: dict | None = None,
        fidelity: dict | None = None,
        lora_weights: str | None = None,
        fuse_lora: bool = False,
        lora_scale: float = 1.0,
        kohya: bool = False,
        card: dict | None = None,
    ):
        super().__init__()
        lora = {**LORA_DEFAULTS, **(to_plain(lora) or {})}
        text_encoder = {**TEXT_ENCODER_DEFAULTS, **(to_plain(text_encoder) or {})}
        inference = {**INFERENCE_DEFAULTS, **(to_plain(inference) or {})}
        fidelity, optimizer, scheduler, card = (to_plain(x) for x in (fidelity, optimizer, scheduler, card))
        self.save_hyperparameters(logger=False)

        parts = load_sdxl(pretrained, vae)
        self.unet, self.vae = parts["unet"], parts["vae"]
        self.text_encoder, self.text_encoder_2 = parts["text_encoder"], parts["text_encoder_2"]
        self.tokenizers = [parts["tokenizer"], parts["tokenizer_2"]]
        self.noise_scheduler = parts["scheduler"]
        if prediction_type:
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(
                f"prediction type '{self.noise_scheduler.config.prediction_type}' is not supported "
                "(model.prediction_type: epsilon or v_prediction)"
            )
        self.inference_scheduler = self._inference_scheduler(inference["scheduler"])
        for module in (self.unet, self.vae, *self.text_encoders):
            module.requires_grad_(False)
        # Lightning keeps each submodule's mode: the trained ones train (LoRA dropout), the rest stay in eval.
        self.unet.train()
        for encoder in self.text_encoders:
            encoder.train(train_text_encoder)
        self.vae.eval()

        if lora_weights:  # inference with an exported LoRA, loaded the way users load it
            if not Path(lora_weights).exists():
                raise UserError(
                    f"model.lora_weights={lora_weights} does not exist: give an exported LoRA folder "
                    "(a run's export/) or a .safetensors file"
                )
            self.pipeline().load_lora_weights(lora_weights)
            for module in (self.unet, *self.text_encoders):
                module.requires_grad_(False)
        else:
            self.unet.add_adapter(self._lora_config(lora["target_modules"]))
            if train_text_encoder:
                # With peft itself, as diffusers' add_adapter does for the UNet: transformers' add_adapter checks
                # the peft version (5.24: peft >= 0.22, newer than any peft release). Adapter "default", as there.
                for encoder in self.text_encoders:
                    inject_adapter_in_model(self._lora_config(text_encoder["target_modules"]), encoder, "default")
                if lora["use_dora"]:
                    log.warning(
                        "model.lora.use_dora with model.train_text_encoder: the LoRA cannot be exported (%s); "
                        "set export_after_train=false and use the checkpoints (ckpt_path) for predict/eval",
                        TEXT_ENCODER_DORA,
                    )
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if train_text_encoder:
                for encoder in self.text_encoders:
                    # Non-reentrant: the frozen embeddings' output needs no requires_grad for the adapters' gradients
                    # (transformers 4 defaults to reentrant and only fixes that for its own add_adapter).
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fidelity: Fidelity | None = None
        self._fused = False
        self.trained_steps: int | None = None  # from a loaded checkpoint, for the model card
        self.generated: dict[str, list[dict]] = {"val": [], "test": []}  # prompt, seed, image (for callbacks)

    # ----------------------------------------------------------------------------------------- parts
    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def _lora_config(self, target_modules: list[str]) -> LoraConfig:
        lora = self.hparams.lora
        return LoraConfig(
            r=lora["rank"],
            lora_alpha=lora["alpha"] or lora["rank"],
            lora_dropout=lora["dropout"],
            use_dora=lora["use_dora"],
            init_lora_weights="gaussian",
            target_modules=target_modules,
        )

    def _inference_scheduler(self, name: str | None):
        """The pipeline's own sampler (from pretrained/scheduler) or a diffusers scheduler class by name."""
        config = self.noise_scheduler.load_config(self.hparams.pretrained, subfolder="scheduler", local_files_only=True)
        name = name or config.get("_class_name", "EulerDiscreteScheduler")
        if not hasattr(diffusers, name):
            raise UserError(
                f"model.inference.scheduler={name} is not a diffusers scheduler class "
                "(e.g. EulerDiscreteScheduler, DPMSolverMultistepScheduler)"
            )
        return getattr(diffusers, name).from_config(config)

    def pipeline(self) -> StableDiffusionXLPipeline:
        """A pipeline over this module's parts (shared, not copied): adapters included."""
        pipeline = StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizers[0],
            tokenizer_2=self.tokenizers[1],
            unet=self.unet,
            scheduler=self.inference_scheduler,
            add_watermarker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    @contextlib.contextmanager
    def base_model(self):
        """The adapters switched off, e.g. to generate class images with the base model after a resume."""
        for module in (self.unet, *self.text_encoders):
            set_lora_enabled(module, False)
        try:
            yield
        finally:
            for module in (self.unet, *self.text_encoders):
                set_lora_enabled(module, True)

    @contextlib.contextmanager
    def full_precision(self):
        """No autocast: the VAE runs in its own dtype (fp32 unless model.vae_fp32=false) whatever the trainer's."""
        with torch.autocast(self.device.type, enabled=False):
            yield

    # ------------------------------------------------------------------------------------- encoding
    def prompt_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text conditioning for a batch; each prompt is encoded once while the text encoders are frozen."""
        if self.hparams.train_text_encoder:
            return encode_prompts(self.tokenizers, self.text_encoders, prompts)
        if not self.hparams.cache_prompt_embeddings:
            with torch.no_grad():
                return encode_prompts(self.tokenizers, self.text_encoders, prompts)
        new = sorted(set(prompts) - set(self._prompt_cache))
        if new:
            with torch.no_grad():
                hidden, pooled = encode_prompts(self.tokenizers, self.text_encoders, new)
            self._prompt_cache.update({p: (h, q) for p, h, q in zip(new, hidden, pooled)})
        return (
            torch.stack([self._prompt_cache[p][0] for p in prompts]),
            torch.stack([self._prompt_cache[p][1] for p in prompts]),
        )

    @torch.no_grad()
    def encode_latent_parameters(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latent distribution (mean and log variance) of images in [-1, 1], in fp32."""
        with self.full_precision():
            return self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.parameters.float()

    def sample_latents(self, batch: dict) -> torch.Tensor:
        """A latent sample per image, from the cached distribution or from the pixels (the same draw)."""
        parameters = batch.get("latent_parameters")
        if parameters is None:
            parameters = self.encode_latent_parameters(batch["pixels"])
        return DiagonalGaussianDistribution(parameters.float()).sample() * self.vae.config.scaling_factor

    # ------------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        dtype = MIXED_DTYPES.get(str(self.trainer.precision))
        vae_dtype = self.vae_dtype(str(self.trainer.precision))
        if self.vae.dtype != vae_dtype:  # (diffusers warns on every cast to a dtype)
            self.vae.to(vae_dtype)
        # Frozen weights in the autocast dtype, adapters in fp32 (as the diffusers script); FSDP keeps one dtype
        # per unit and casts for compute itself.
        if dtype is not None and not isinstance(self.trainer.strategy, FSDPStrategy):
            for module in (self.unet, *self.text_encoders):
                module.to(dtype)
            cast_training_params([self.unet, *self.text_encoders], torch.float32)

    def vae_dtype(self, precision: str) -> torch.dtype:
        """fp32, or with model.vae_fp32=false the 16-bit dtype of `precision`; fp16 only for a VAE that is safe in
        it (config force_upcast=false, as diffusers marks madebyollin/sdxl-vae-fp16-fix): SDXL's own VAE overflows
        to NaN (black images) in fp16."""
        dtype = MIXED_DTYPES.get(precision)
        if self.hparams.vae_fp32 or dtype is None:
            return torch.float32
        if dtype == torch.float16 and self.vae.config.get("force_upcast", True):
            vae = self.hparams.vae or f"{self.hparams.pretrained}/vae"
            raise UserError(
                f"trainer.precision=16-mixed with model.vae_fp32=false: the VAE {vae} is not made for fp16 (its "
                "config has force_upcast=true) and would give NaN, black images. Set model.vae_fp32=true, or "
                "model.vae=madebyollin/sdxl-vae-fp16-fix"
            )
        return dtype

    def on_train_end(self) -> None:
        """Before the test pass that follows training (generation and the fidelity models need memory): the optimizer
        state goes (every checkpoint holding it is written by now) and freed memory is handed back."""
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if hasattr(datamodule, "prepare_class_images"):
            if self.trainer.is_global_zero:
                with self.base_model():
                    datamodule.prepare_class_images(self.generate)
            self.trainer.strategy.barrier()
        if hasattr(datamodule, "enable_latent_cache"):
            datamodule.enable_latent_cache(self.encode_latent_parameters)

    def loss(self, batch: dict) -> torch.Tensor:
        latents = self.sample_latents(batch)
        noise = torch.randn(latents.shape, device=latents.device)  # not randn_like: it follows the memory layout
        if self.hparams.noise_offset:
            noise = noise + self.hparams.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=self.device)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), device=self.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden, pooled = self.prompt_embeddings(batch["prompts"])
        conditioning = time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        prediction = self.unet(
            noisy,
            timesteps,
            hidden,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": conditioning.to(self.device, hidden.dtype)},
        ).sample
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        n = batch["num_instance"]
        loss = (per_image[:n] * self.snr_weights(timesteps[:n])).mean()
        if len(per_image) > n:  # prior preservation: the class half of the batch
            loss = loss + self.hparams.prior_loss_weight * per_image[n:].mean()
        return loss

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for noise prediction,
        min(SNR, gamma) / (SNR + 1) for v-prediction; all ones without snr_gamma."""
        gamma = self.hparams.snr_gamma
        if gamma is None:
            return torch.ones(len(timesteps), device=timesteps.device)
        snr = compute_snr(self.noise_scheduler, timesteps)
        clipped = snr.clamp(max=gamma)
        return clipped / (snr + 1 if self.noise_scheduler.config.prediction_type == "v_prediction" else snr)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["num_instance"])
        return loss

    def configure_optimizers(self):
        named = [(name, p) for name, p in self.trainer.model.named_parameters() if p.requires_grad]
        if not named:
            raise UserError(
                "nothing to train: model.lora_weights loads a finished LoRA for eval/predict; "
                "to continue training use ckpt_path=<checkpoint>"
            )
        groups = [{"params": [p for name, p in named if "text_encoder" not in name]}]
        text_encoder = [p for name, p in named if "text_encoder" in name]
        if text_encoder:
            groups.append(
                {
                    "params": text_encoder,
                    "lr": self.hparams.text_encoder["lr"],
                    "weight_decay": self.hparams.text_encoder["weight_decay"],
                }
            )
        optimizer = self._optimizer_factory()(groups)
        if not self.hparams.scheduler:
            return optimizer
        scheduler = hydra.utils.instantiate(self.hparams.scheduler)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _optimizer_factory(self):
        # Plain lists, not ListConfig (e.g. Prodigy keeps `betas` as given): checkpoints load with weights_only.
        factory = hydra.utils.instantiate(self.hparams.optimizer, _convert_="all")
        if not self.hparams.use_8bit_adam:
            return factory
        if factory.func is not torch.optim.AdamW:
            raise UserError(
                "model.use_8bit_adam=true replaces torch.optim.AdamW by bitsandbytes' AdamW8bit; with "
                f"model.optimizer._target_={self.hparams.optimizer['_target_']} set it false"
            )
        try:
            import bitsandbytes
        except ImportError:
            raise UserError("model.use_8bit_adam=true needs bitsandbytes: pip install bitsandbytes") from None
        if self.device.type != "cuda":
            raise UserError("model.use_8bit_adam=true needs a CUDA GPU (trainer=gpu); on other devices set it false")
        return lambda groups: bitsandbytes.optim.AdamW8bit(groups, **factory.keywords)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = {name for name, p in self.named_parameters() if p.requires_grad} - set(checkpoint["state_dict"])
        if missing:
            raise UserError(
                f"the checkpoint lacks {len(missing)} adapter weights of this model (e.g. "
                f"{sorted(missing)[0]}): it was trained with other LoRA settings (model.lora, "
                "model.train_text_encoder)"
            )
        # Checkpoints hold only the adapters: the frozen weights are those this module was built with.
        checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}
        self.trained_steps = checkpoint.get("global_step", 0)

    # ----------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> list:
        """PIL images for prompts, one fixed seed each (CPU generators: the same images on any device)."""
        pipeline = self.pipeline()
        inference = self.hparams.inference
        latents = pipeline(
            prompt=list(prompts),
            height=self.hparams.resolution,
            width=self.hparams.resolution,
            num_inference_steps=inference["num_inference_steps"],
            guidance_scale=inference["guidance_scale"],
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            output_type="latent",
        ).images
        with self.full_precision():
            images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        broken = sorted({p for p, image in zip(prompts, images) if not torch.isfinite(image).all()})
        if broken:
            raise UserError(
                f"images generated{self._at_step()} hold NaN or inf (prompts: {' | '.join(broken)}): {GENERATION_HINT}"
            )
        return pipeline.image_processor.postprocess(images.float(), output_type="pil")

    def _at_step(self) -> str:
        return f" at global step {self.trainer.global_step}" if self._trainer is not None else ""

    def _check_black(self, stage: str) -> None:
        """Stop when every image of a prompt (its grid) is black: a broken VAE or a diverged model."""
        grids: dict[str, list[bool]] = {}
        for row in self.generated[stage]:
            grids.setdefault(row["prompt"], []).append(not np.asarray(row["image"]).any())
        black = [prompt for prompt, flags in grids.items() if all(flags)]
        if black:
            raise UserError(
                f"the {stage} images{self._at_step()} are all black for prompt(s) {' | '.join(black)}: "
                f"{GENERATION_HINT}"
            )

    def _generate_rows(self, batch: dict) -> list[dict]:
        images = self.generate(batch["prompt"], batch["seed"])
        return [
            {"prompt": p, "seed": s, "index": i, "image": image}
            for p, s, i, image in zip(batch["prompt"], batch["seed"], batch["index"], images)
        ]

    def _fuse_once(self) -> None:
        if self.hparams.fuse_lora and not self._fused:
            components = [n for n in ("unet", *TEXT_ENCODERS) if getattr(getattr(self, n), "peft_config", None)]
            self.pipeline().fuse_lora(components=components, lora_scale=self.hparams.lora_scale)
            self._fused = True

    def on_validation_epoch_start(self) -> None:
        self.generated["val"] = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.generated["val"] += self._generate_rows(batch)

    def on_validation_epoch_end(self) -> None:
        self._score("val")

    def on_test_epoch_start(self) -> None:
        self._fuse_once()
        self.generated["test"] = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.generated["test"] += self._generate_rows(batch)

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def _score(self, stage: str) -> None:
        """Fidelity of the stage's images (every rank's, once each): stage/CLIP-T, stage/CLIP-I, stage/DINO."""
        rows = {row["index"]: row for part in gather_objects(self.generated[stage]) for row in part}
        self.generated[stage] = [rows[i] for i in sorted(rows)]
        self._check_black(stage)
        metrics = {}
        if self.trainer.is_global_zero and self.generated[stage] and self.fidelity() is not None:
            datamodule = self.trainer.datamodule
            references = datamodule.reference_images() if hasattr(datamodule, "reference_images") else None
            metrics = self.fidelity().to(self.device)(
                [r["image"] for r in self.generated[stage]], [r["prompt"] for r in self.generated[stage]], references
            )
        for name, value in self.trainer.strategy.broadcast(metrics).items():
            self.log(f"{stage}/{name}", value)

    def fidelity(self) -> Fidelity | None:
        """The fidelity models (model.fidelity.clip / .dino), loaded on first use; None when neither is set."""
        config = self.hparams.fidelity or {}
        if self._fidelity is None and (config.get("clip") or config.get("dino")):
            self._fidelity = Fidelity(config.get("clip"), config.get("dino"))
        return self._fidelity

    def on_predict_start(self) -> None:
        self._fuse_once()

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return [
            {
                "image": f"{row['index']:04d}_{prompt_slug(row['prompt'])}_seed{row['seed']}.png",
                "prompt": row["prompt"],
                "seed": row["seed"],
                "pil": row["image"],
            }
            for row in self._generate_rows(batch)
        ]

    def save_predictions(self, rows: list[dict], output_dir: Path) -> dict[str, float]:
        """PNGs under output_dir/images/ and predictions.json / prompts.csv: file, prompt, seed."""
        for row in rows:
            atomic_write(output_dir / "images" / row["image"], lambda f, im=row["pil"]: im.save(f, format="PNG"), "wb")
        listing = [{key: row[key] for key in ("image", "prompt", "seed")} for row in rows]
        write_json(output_dir / "predictions.json", listing)
        log.info("wrote %d images to %s", len(rows), output_dir / "images")
        return {"predict/images": float(len(rows))}

    # ---------------------------------------------------------------------------------------- export
    def export(self, directory: str | Path) -> Path:
        """pytorch_lora_weights.safetensors (+ the Kohya layout with model.kohya=true) and a README.md model card."""
        if self.hparams.lora_weights:
            raise UserError(
                "model.lora_weights is already an exported LoRA: export a training checkpoint "
                "(mode=export ckpt_path=...) instead"
            )
        if self.hparams.lora["use_dora"] and self.hparams.train_text_encoder:
            raise UserError(
                f"a LoRA with model.lora.use_dora=true and model.train_text_encoder=true is not exported: "
                f"{TEXT_ENCODER_DORA}. Nothing was written; use the checkpoint (ckpt_path=...) for predict/eval, or "
                "train with model.lora.use_dora=false or model.train_text_encoder=false"
            )
        directory = Path(directory)
        alpha = self.hparams.lora["alpha"] or self.hparams.lora["rank"]
        with atomic_dir(directory) as tmp:
            save_lora(
                tmp,
                {"unet": self.unet, **dict(zip(TEXT_ENCODERS, self.text_encoders))},
                kohya_alpha=alpha if self.hparams.kohya else None,
            )
            (tmp / "README.md").write_text(self.model_card(), encoding="utf-8")
        return directory

    def model_card(self) -> str:
        hp, card = self.hparams, self.hparams.card or {}
        steps = self.trainer.global_step if self._trainer is not None else self.trained_steps
        trigger = card.get("trigger_word") or "(none)"
        settings = {
            "rank": hp.lora["rank"],
            "alpha": hp.lora["alpha"] or hp.lora["rank"],
            "dropout": hp.lora["dropout"],
            "DoRA": hp.lora["use_dora"],
            "target modules": hp.lora["target_modules"],
            "text encoder LoRA": hp.train_text_encoder,
            "learning rate": (hp.optimizer or {}).get("lr"),
            "training steps": steps,
            "resolution": hp.resolution,
            "snr_gamma": hp.snr_gamma,
            "noise_offset": hp.noise_offset,
            "prior preservation": card.get("prior_preservation"),
            "VAE": hp.vae or "the pipeline's",
        }
        rows = "\n".join(
            f"| {key} | {json.dumps(value) if isinstance(value, list) else value} |" for key, value in settings.items()
        )
        prompt = card.get("instance_prompt") or f"a photo of {trigger}"
        prior = " and prior preservation" if card.get("prior_preservation") else ""
        return f"""---
base_model: {hp.pretrained}
library_name: diffusers
tags: [text-to-image, stable-diffusion-xl, lora, dreambooth]
instance_prompt: {json.dumps(prompt)}
---

# SDXL LoRA ({card.get("name") or "DreamBooth"})

LoRA adapters for `{hp.pretrained}`, trained with DreamBooth{prior}.

**Trigger word:** `{trigger}`. Use it in prompts, e.g. "{prompt}".

```python
import torch
from diffusers import StableDiffusionXLPipeline

pipe = StableDiffusionXLPipeline.from_pretrained("{hp.pretrained}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors
image = pipe({json.dumps(prompt)}, num_inference_steps=25).images[0]
```

`pytorch_lora_weights_kohya.safetensors`, when present, is the same LoRA in the Kohya layout
(AUTOMATIC1111, ComfyUI; in diffusers:
`pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights_kohya.safetensors")`).

| setting | value |
| --- | --- |
{rows}
"""
