"""DreamBooth / style LoRA for Stable Diffusion XL, as diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py
trains it, in a LightningModule: the wiring, the loss, the optimizers and Lightning's hooks. The parts it drives:

- parts.py: the base model (UNet, VAE, both CLIP text encoders and tokenizers, DDPM noise scheduler) from
  `pretrained`, an optional separate `vae` replacing the pipeline's. All of it is frozen; peft LoRA adapters
  on the UNet attention projections (and, with `train_text_encoder`, on both text encoders, with their
  own learning rate) are what trains. Under bf16/fp16 mixed precision the frozen UNet and text-encoder weights
  are cast to that dtype, the adapters stay fp32; the VAE runs in fp32 (`vae_fp32`), or in the 16-bit dtype where
  it is safe there (`vae_dtype`: under fp16 only a VAE made for it, such as madebyollin/sdxl-vae-fp16-fix).
- sampling.py: validation / test / predict generate images for prompts with fixed seeds; validation and test score
  them (CLIP-T, CLIP-I, DINO: fidelity.py). Generated images with NaN, or a validation/test prompt whose images are
  all black, stop the run with the step.
- export.py: `export` writes pytorch_lora_weights.safetensors (diffusers layout; optionally Kohya; LoHa / LoKr in the
  LyCORIS layout alone) and a model card.
  Without ckpt_path, eval/predict use the base model plus an exported LoRA folder (`lora_weights`).

Here: the loss (MSE to the noise or the velocity, as the scheduler's prediction_type says; min-SNR `snr_gamma`,
`noise_offset`, `multires_noise` (parts.multires_noise), prior preservation with class examples in the batch, loss
masks (data.masks: parts.masked_mean); SDXL micro-conditioning from each image's original size, crop and target
size), prompt embeddings encoded once while the text encoders are frozen, the optimizers, checkpoints holding only
the adapters (and their `ema`: diffusers' EMAModel, which validation, test, predict and export use), `compile` and
`quantize_base` of the UNet, the best checkpoint by `fidelity.select` (configure_callbacks), val/class_drift, and
what the data's preparation needs of the model (class images, latents: `write_class_images`,
`encode_latent_parameters`, called by framework/preparation.py).

Under trainer=fsdp the UNet is sharded (conf/model/sharding/sdxl.yaml: its transformer and ResNet blocks are the FSDP
units, the UNet the root); the VAE and the frozen text encoders are replicated on every rank, unsharded (LoRA on the
text encoders is refused there: nothing would average their gradients). The random numbers of a step (latent sample,
noise, timesteps) are drawn for the whole global batch on every rank, each keeping its rows (`rows_of_rank`), so a
sharded run draws what one process draws.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from pathlib import Path
from typing import Annotated, Literal

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import EMAModel, compute_snr
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy

from framework.config import to_plain
from framework.contracts import (
    BuildsFromConfig,
    Exports,
    InferenceOverrides,
    SavesPredictions,
)
from framework.errors import UserError
from framework.fsdp import FSDP2Strategy, ShardedByLayers, full_state_dict, is_sharded
from framework.optim import ConfiguredOptimizers, fused_adam_by_default
from framework.schema import ExistingPath, MultipleOf, NonNegativeFloat, PositiveFloat, Range
from lightning_modules.generation import parts, sampling
from lightning_modules.generation.export import CardSettings, export_lora
from lightning_modules.generation.parts import EmaSettings, LoraSettings, MultiresNoiseSettings, TextEncoderSettings
from lightning_modules.generation.sampling import FidelitySettings, InferenceSettings
from lightning_modules.generation.sdxl import TEXT_ENCODERS, encode_prompts, load_sdxl, time_ids

log = logging.getLogger(__name__)


class DreamBoothLoRA(
    ShardedByLayers,
    ConfiguredOptimizers,
    L.LightningModule,
    BuildsFromConfig,
    InferenceOverrides,
    SavesPredictions,
    Exports,
):
    scheduler_interval = "step"
    # the images are generated at the training images' size; the class prompt's images measure the class drift
    data_inputs = ("resolution", "class_prompt")
    inference_hparams = ("inference", "fidelity", "lora_weights", "fuse_lora", "lora_scale", "kohya")

    def __init__(
        self,
        pretrained: str,
        vae: str | None,
        resolution: Annotated[int, Range(min=64), MultipleOf(8)],
        lora: LoraSettings,
        train_text_encoder: bool,
        text_encoder: TextEncoderSettings,
        optimizer: dict | None,
        scheduler: dict | None,
        use_8bit_adam: bool,
        prediction_type: Literal["epsilon", "v_prediction"] | None,
        snr_gamma: PositiveFloat | None,
        noise_offset: NonNegativeFloat,
        prior_loss_weight: NonNegativeFloat,
        gradient_checkpointing: bool,
        cache_prompt_embeddings: bool,
        inference: InferenceSettings,
        fidelity: FidelitySettings | None,
        lora_weights: ExistingPath | None,
        fuse_lora: bool,
        lora_scale: float,
        kohya: bool,
        card: CardSettings | None,
        vae_fp32: bool = True,  # framework.config.SIGNATURE_DEFAULTS: checkpoints from before the key lack it
        multires_noise: MultiresNoiseSettings | None = None,  # the same; None: off
        ema: EmaSettings | None = None,  # the same; None: off
        compile: bool = False,  # the same
        class_prompt: str | None = None,  # the same (a data input: data.class_prompt); None: no class drift
        quantize_base: Literal["int8", "fp8", "int4"] | None = None,  # checkpoints from before the key; None: off
    ):
        """The settings and their defaults: conf/model/sdxl_lora.yaml; `resolution` (of the generated images) is the
        data's (`data_inputs`: data.resolution), and so is `class_prompt` (data.class_prompt)."""
        super().__init__()
        lora, text_encoder, inference, fidelity, optimizer, scheduler, card, multires_noise, ema = (
            to_plain(x)
            for x in (lora, text_encoder, inference, fidelity, optimizer, scheduler, card, multires_noise, ema)
        )
        self.save_hyperparameters(logger=False)

        loaded = load_sdxl(pretrained, vae)
        self.unet, self.vae = loaded["unet"], loaded["vae"]
        self.text_encoder, self.text_encoder_2 = loaded["text_encoder"], loaded["text_encoder_2"]
        self.tokenizers = [loaded["tokenizer"], loaded["tokenizer_2"]]
        self.noise_scheduler = loaded["scheduler"]
        if prediction_type:
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):  # the pipeline's own
            raise UserError(
                f"the noise scheduler of model.pretrained={pretrained} predicts "
                f"'{self.noise_scheduler.config.prediction_type}', which is not supported: set "
                "model.prediction_type=epsilon or v_prediction"
            )
        self.inference_scheduler = parts.inference_scheduler(self.noise_scheduler, pretrained, inference["scheduler"])
        parts.freeze(self.unet, self.vae, self.text_encoders, train_text_encoder)
        if lora_weights:  # inference with an exported LoRA (a folder or a .safetensors file), loaded as users load it
            self.pipeline().load_lora_weights(lora_weights)
            for module in (self.unet, *self.text_encoders):
                module.requires_grad_(False)
        else:
            parts.add_adapters(self.unet, self.text_encoders, lora, text_encoder, train_text_encoder)
        if quantize_base and fuse_lora:
            raise UserError(
                "model.fuse_lora=true cannot fuse adapters into a quantised UNet "
                f"(model.quantize_base={quantize_base}): set one of them to false/null"
            )
        if gradient_checkpointing:
            parts.enable_gradient_checkpointing(self.unet, self.text_encoders, train_text_encoder)
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if compile:
            # In place (nn.Module.compile): parameter names and checkpoints stay those of the plain UNet. Inductor
            # compiles at the first call of each input shape: the first training step, the first validation.
            self.unet.compile()
        self._first_step_started: float | None = None  # model.compile: None until the first training step
        self._quantised = False  # model.quantize_base: at setup, once the precision's dtype is known
        sampling.check_selection(fidelity)
        self._fidelity = sampling.LazyFidelity(fidelity)
        self._fused = False
        self._references = lambda: None  # the instance images, once the data hands them over (use_reference_images)
        self.trained_steps: int | None = None  # the global step of the weights held (a loaded checkpoint's, the fit's)
        self._ema: EMAModel | None = None  # while fitting with model.ema (on_fit_start)
        self._loaded_ema: dict | None = None  # a checkpoint's EMA state, until fit resumes it or inference uses it
        self.generated: dict[str, list[dict]] = {"val": [], "test": []}  # prompt, seed, image (for callbacks)

    # ----------------------------------------------------------------------------------------- parts
    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def pipeline(self):
        """A StableDiffusionXLPipeline over this module's parts (shared, not copied): adapters included."""
        return parts.pipeline(self.unet, self.vae, self.text_encoders, self.tokenizers, self.inference_scheduler)

    def base_model(self):
        """The adapters switched off (a context), e.g. to generate class images with the base model after a resume."""
        return parts.adapters_disabled([self.unet, *self.text_encoders])

    def vae_dtype(self, precision: str) -> torch.dtype:
        """The VAE's dtype under `precision` (parts.vae_dtype)."""
        vae = self.hparams.vae or f"{self.hparams.pretrained}/vae"
        return parts.vae_dtype(self.vae, precision, self.hparams.vae_fp32, vae)

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        vae_dtype = self.vae_dtype(precision)
        if self.vae.dtype != vae_dtype:  # (diffusers warns on every cast to a dtype)
            self.vae.to(vae_dtype)
        sharded = isinstance(self.trainer.strategy, (FSDP2Strategy, FSDPStrategy))
        if sharded and self._uses_ema():
            raise UserError(
                "model.ema with a sharded UNet (trainer=fsdp) is not supported: the average would be sharded like the "
                "adapters and the checkpoints do not hold it. Set model.ema.decay=null, or use trainer=ddp"
            )
        if sharded and self.hparams.compile:
            raise UserError(
                "model.compile=true with a sharded UNet (trainer=fsdp) is not supported: set model.compile=false, or "
                "use trainer=ddp"
            )
        if isinstance(self.trainer.strategy, FSDP2Strategy):
            if self.hparams.train_text_encoder:
                raise UserError(
                    "trainer=fsdp shards the UNet only; the text encoders stay whole on every rank, where their LoRA "
                    "gradients would not be averaged: set model.train_text_encoder=false, or use trainer=ddp"
                )
            parts.cast_frozen(self.text_encoders, precision)  # the sharded UNet: fp32, cast for compute by FSDP
            # Checkpoints hold the adapters only (on_save_checkpoint): FSDP2Strategy loads a sharded one's alone.
            self.strict_loading = False
        elif not isinstance(self.trainer.strategy, FSDPStrategy):  # FSDP keeps one dtype per unit, casts for compute
            parts.cast_frozen([self.unet, *self.text_encoders], precision)
        if self.hparams.quantize_base and not self._quantised:
            if sharded:
                raise UserError(
                    "model.quantize_base with a sharded UNet (trainer=fsdp) is not supported: set it null, or use "
                    "trainer=ddp"
                )
            # after the cast: quanto's scales keep the dtype the weights had, and compute in it
            before, after = parts.quantize_frozen(self.unet, self.hparams.quantize_base)
            self._quantised = True
            log.info(
                "model.quantize_base=%s: the frozen UNet holds %.1f MB (%.1f MB unquantised)",
                self.hparams.quantize_base,
                after / 2**20,
                before / 2**20,
            )

    def _uses_ema(self) -> bool:
        return bool(self.hparams.ema and self.hparams.ema["decay"])

    def fsdp_root(self) -> torch.nn.Module:
        return self.unet

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
        """The VAE's latent distribution (mean and log variance) of images in [-1, 1], in fp32. No autocast: the VAE
        runs in its own dtype (fp32 unless model.vae_fp32=false) whatever the trainer's."""
        with torch.autocast(self.device.type, enabled=False):
            # the dtype of the layer that reads the pixels: ModelMixin.dtype walks every submodule (~0.3 ms a step)
            dtype = self.vae.encoder.conv_in.weight.dtype
            return self.vae.encode(pixels.to(self.device, dtype)).latent_dist.parameters.float()

    def sample_latents(self, batch: dict) -> torch.Tensor:
        """A latent sample per image, from the cached distribution or from the pixels (the same draw), as
        DiagonalGaussianDistribution.sample draws it."""
        parameters = batch.get("latent_parameters")
        if parameters is None:
            parameters = self.encode_latent_parameters(batch["pixels"])
        distribution = DiagonalGaussianDistribution(parameters.float())
        sample = self.rows_of_rank(torch.randn, distribution.mean.shape, device=parameters.device)
        return (distribution.mean + distribution.std * sample) * self.vae.config.scaling_factor

    def rows_of_rank(self, draw, shape: tuple[int, ...], **kwargs) -> torch.Tensor:
        """`draw(shape, **kwargs)` (torch.randn, ...) for this rank's rows of the global batch: every rank draws the
        rows of all W ranks from the global RNG (seeded alike on every rank, so it stays alike) and keeps rows r, r +
        W, ...: the global batch's items rank r gets from the data's sampler (EpochSampler: positions r, r + W, ...).
        One process (W = 1) draws exactly `draw(shape)`."""
        world, rank = (self._trainer.world_size, self._trainer.global_rank) if self._trainer is not None else (1, 0)
        return draw((shape[0] * world, *shape[1:]), **kwargs)[rank::world]

    # ------------------------------------------------------------------------------------- training
    def write_class_images(self, missing: list[tuple[str, int, Path]], batch_size: int, write: bool = True) -> None:
        """The class images prior preservation lacks ((prompt, seed, path) each), generated by the base model (the
        adapters off), `batch_size` at a time, written unless `write` is false (the ranks of a sharded UNet generate
        together, rank 0 writes). Called at fit start, where the model is on its device (framework/preparation.py)."""
        with self.base_model():
            sampling.write_images(self.generate, missing, batch_size, write)

    def use_reference_images(self, read) -> None:
        """`read()`: the real instance images that subject fidelity (CLIP-I, DINO) compares generated ones with,
        read only when a stage is scored."""
        self._references = read

    def free_memory(self) -> None:
        """Before the test pass that follows training (generation and the fidelity models need memory): the optimizer
        state goes (every checkpoint holding it is written by now) and freed GPU memory is handed back. No full
        garbage collection off CUDA: the state's tensors go with their last reference, and a collection walks every
        Python object of the libraries loaded (0.3 s on a CPU, at the end of every fit)."""
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def prediction_error(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's squared error per latent element [B, C, h, w] against the noise (or the velocity, as the
        scheduler's prediction_type says), in fp32, and the timesteps drawn."""
        latents = self.sample_latents(batch)
        # not randn_like: it follows the memory layout
        noise = self.rows_of_rank(torch.randn, latents.shape, device=latents.device)
        if self.hparams.noise_offset:
            offset = self.rows_of_rank(torch.randn, (*latents.shape[:2], 1, 1), device=self.device)
            noise = noise + self.hparams.noise_offset * offset
        if self.hparams.multires_noise and self.hparams.multires_noise["iterations"]:
            draw = functools.partial(self.rows_of_rank, torch.randn, device=latents.device)
            noise = parts.multires_noise(noise, **self.hparams.multires_noise, draw=draw)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = self.rows_of_rank(
            lambda shape, **kw: torch.randint(0, steps, shape, **kw), (len(latents),), device=self.device
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
        return F.mse_loss(prediction.float(), target.float(), reduction="none"), timesteps

    def loss(self, batch: dict) -> torch.Tensor:
        """The mean error of the instance images (min-SNR weighted; with data.masks over each mask's white part) plus,
        with prior preservation, prior_loss_weight times the class images'."""
        error, timesteps = self.prediction_error(batch)
        mask = batch.get("mask")
        per_image = error.mean(dim=(1, 2, 3)) if mask is None else parts.masked_mean(error, mask.to(error.device))
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
        if self.hparams.compile and self._first_step_started is None:  # (0.0 once logged)
            self._first_step_started = time.perf_counter()
        loss = self.loss(batch)
        if self._logs_loss():
            # sync_dist: every rank's loss is its share's; their mean is the global batch's, as one process logs it
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["num_instance"], sync_dist=True)
        return loss

    def _logs_loss(self) -> bool:
        """Whether this step logs train/loss: at the logger's steps (every trainer.log_every_n_steps) and at the last
        step, whose loss metrics.json keeps. Not every step: a self.log call costs Lightning about 1 ms on the CPU, 5%
        of a tiny pipeline's step (benchmarks/dreambooth.py); the progress bar's loss changes at the logger's steps."""
        trainer = self.trainer
        step, every = trainer.global_step + 1, trainer.log_every_n_steps
        last = step == trainer.max_steps or (trainer.is_last_batch and trainer.current_epoch + 1 == trainer.max_epochs)
        return last or (every > 0 and step % every == 0)

    # ------------------------------------------------------------------------------------------- EMA
    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def on_fit_start(self) -> None:
        """With model.ema: the average starts from the weights (on their device), or from a resumed checkpoint's."""
        if not self._uses_ema():
            return
        self._ema = EMAModel(self.trained_parameters(), decay=self.hparams.ema["decay"], foreach=True)
        if self._loaded_ema is not None:
            self._ema.load_state_dict(self._loaded_ema)
            self._ema.to(self.device)
            self._loaded_ema = None

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self._first_step_started:  # once (a clock reading; 0.0 once logged): the first step compiles
            log.info(
                "model.compile: the first training step took %.1f s (the UNet's forward and backward compiled)",
                time.perf_counter() - self._first_step_started,
            )
            self._first_step_started = 0.0
        # Lightning counts the step (global_step) after this hook: this is step global_step + 1.
        if self._ema is not None and (self.trainer.global_step + 1) % self.hparams.ema["update_every"] == 0:
            self._ema.step(self.trained_parameters())

    def on_train_end(self) -> None:
        """Training over: the average becomes the weights (the test, predict and export that follow use them); the
        optimizer state goes and freed GPU memory is handed back (`free_memory`)."""
        self.trained_steps = self.trainer.global_step
        if self._ema is not None:
            self._ema.copy_to(self.trained_parameters())
            self._ema = None
        self.free_memory()

    def use_loaded_ema(self) -> None:
        """A checkpoint's EMA weights (model.ema) into the adapters, for inference from it (test, predict, export)."""
        if self._loaded_ema is None:
            return
        trained = self.trained_parameters()
        if len(self._loaded_ema["shadow_params"]) != len(trained):
            raise UserError(
                f"the checkpoint's EMA holds {len(self._loaded_ema['shadow_params'])} tensors, this model trains "
                f"{len(trained)}: it was trained with other LoRA settings (model.lora, model.train_text_encoder)"
            )
        with torch.no_grad():
            for weight, average in zip(trained, self._loaded_ema["shadow_params"]):
                weight.copy_(average)
        self._loaded_ema = None

    def optimizer_params(self) -> list[dict]:
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
        return groups

    def optimizer_factory(self):
        factory = super().optimizer_factory()
        if not self.hparams.use_8bit_adam:
            return fused_adam_by_default(factory, self.device, mixed_precision="mixed" in str(self.trainer.precision))
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
        if self._ema is not None:
            checkpoint["ema"] = self._ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.trained_steps = checkpoint.get("global_step", 0)
        self._loaded_ema = checkpoint.get("ema")  # resumed by on_fit_start, or used for inference (use_loaded_ema)
        if "state_dict" not in checkpoint:  # sharded: FSDP2Strategy.load_checkpoint loaded (and checked) the adapters
            return
        missing = {name for name, p in self.named_parameters() if p.requires_grad} - set(checkpoint["state_dict"])
        if missing:
            raise UserError(
                f"the checkpoint lacks {len(missing)} adapter weights of this model (e.g. "
                f"{sorted(missing)[0]}): it was trained with other LoRA settings (model.lora, "
                "model.train_text_encoder)"
            )
        # Checkpoints hold only the adapters: the frozen weights are those this module was built with.
        checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}

    # ----------------------------------------------------------------------------------- generation
    def generate(self, prompts: list[str], seeds: list[int]) -> list:
        """PIL images for prompts, one fixed seed each (sampling.generate)."""
        return sampling.generate(
            self.pipeline(), prompts, seeds, self.hparams.resolution, self.hparams.inference, self._at_step()
        )

    def _at_step(self) -> str:
        return f" at global step {self.trainer.global_step}" if self._trainer is not None else ""

    def _generate_rows(self, batch: dict) -> list[dict]:
        return sampling.image_rows(batch, self.generate(batch["prompt"], batch["seed"]))

    def _fuse_once(self) -> None:
        if self.hparams.fuse_lora and not self._fused:
            components = [n for n in ("unet", *TEXT_ENCODERS) if getattr(getattr(self, n), "peft_config", None)]
            self.pipeline().fuse_lora(components=components, lora_scale=self.hparams.lora_scale)
            self._fused = True

    def configure_callbacks(self) -> list[L.Callback]:
        """With model.fidelity.select: the checkpoint of the best val/fidelity, kept beside last.ckpt; the test after
        training and the export use it (framework.runner takes the best of a callback that monitors a val/ metric)."""
        if not (self.hparams.fidelity or {}).get("select"):
            return []
        return [
            ModelCheckpoint(
                dirpath=Path(self.trainer.default_root_dir) / "checkpoints",
                filename="best_fidelity_step{step:06d}",
                auto_insert_metric_name=False,
                monitor="val/fidelity",
                mode="max",
                save_top_k=1,
                enable_version_counter=False,
            )
        ]

    def on_validation_epoch_start(self) -> None:
        if self._ema is not None:  # validation draws with the averaged weights, training goes on with its own
            self._ema.store(self.trained_parameters())
            self._ema.copy_to(self.trained_parameters())
        self.generated["val"] = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.generated["val"] += self._generate_rows(batch)

    def on_validation_epoch_end(self) -> None:
        self._score("val")
        if self._ema is not None:
            self._ema.restore(self.trained_parameters())

    def on_test_epoch_start(self) -> None:
        self.use_loaded_ema()
        self._fuse_once()
        self.generated["test"] = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.generated["test"] += self._generate_rows(batch)

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def class_drift(self) -> float | None:
        """How far the class drifted from the base model: the class prompt with seeds 0, 1, ... (model.fidelity.
        class_drift_images) through the trained model and the base model (adapters off), the mean DINO (without
        DINO: CLIP image) similarity of each pair; 1 = unchanged. None without a class prompt, images or a model.
        Every rank generates (a sharded UNet needs them all); the similarity is rank 0's."""
        count = (self.hparams.fidelity or {}).get("class_drift_images", 0)
        models = self._fidelity.get() if self.hparams.class_prompt and count else None
        if models is None:
            return None
        prompts, seeds = [self.hparams.class_prompt] * count, list(range(count))
        trained = self.generate(prompts, seeds)
        with self.base_model():
            base = self.generate(prompts, seeds)
        return models.to(self.device).pair_similarity(trained, base) if self.trainer.is_global_zero else None

    def _score(self, stage: str) -> None:
        """Fidelity of the stage's images (every rank's, once each): stage/CLIP-T, stage/CLIP-I, stage/DINO; with
        model.fidelity.select stage/fidelity, and at validation val/class_drift (`class_drift`)."""
        self.generated[stage] = sampling.gather_rows(self.generated[stage])
        sampling.check_black(self.generated[stage], stage, self._at_step())
        drift = self.class_drift() if stage == "val" else None
        metrics = {} if drift is None else {"class_drift": drift}
        if self.trainer.is_global_zero:
            metrics |= self._fidelity.score(self.generated[stage], self._references, self.device)
            weights = (self.hparams.fidelity or {}).get("select")
            if weights and set(weights) <= set(metrics):
                metrics["fidelity"] = sampling.selection_score(metrics, weights)
        for name, value in self.trainer.strategy.broadcast(metrics).items():
            self.log(f"{stage}/{name}", value)

    def on_predict_start(self) -> None:
        self.use_loaded_ema()
        self._fuse_once()

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return sampling.prediction_rows(self._generate_rows(batch))

    save_predictions = staticmethod(sampling.save_predictions)  # what the runner calls with predict's rows

    # ---------------------------------------------------------------------------------------- export
    def export(self, directory: str | Path) -> Path:
        """pytorch_lora_weights.safetensors (+ the Kohya layout with model.kohya=true) and a README.md model card."""
        self.use_loaded_ema()
        steps = self.trained_steps  # the fit's last, or the checkpoint's the test after it loaded (the best)
        log.info("exporting the adapter weights of global step %s", steps)
        if not is_sharded(self.unet):
            return export_lora(directory, self.unet, self.text_encoders, self.hparams, steps)
        # Every rank gathers the UNet's adapters (the frozen weights stay sharded); rank 0 writes.
        unet = full_state_dict(self.unet, trained_only=True)
        if dist.get_rank() == 0:
            export_lora(directory, self.unet, self.text_encoders, self.hparams, steps, {"unet": unet})
        return Path(directory)
