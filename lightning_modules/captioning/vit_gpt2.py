"""ViT-GPT2 captioner: transformers' VisionEncoderDecoderModel (a ViT encoder, a GPT-2 decoder with cross-attention)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel
from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import shift_tokens_right

from datamodules.batches import CaptionBatch
from framework.errors import UserError
from framework.pretrained import load_offline
from lightning_modules.captioning.hf import IGNORE, HFCaptioner


class ViTGPT2Captioner(HFCaptioner):
    """Loaded from one checkpoint (`pretrained`, e.g. nlpconnect/vit-gpt2-image-captioning), or assembled from an
    image encoder (`encoder_pretrained`, e.g. google/vit-base-patch16-224-in21k, with its image processor) and a
    text decoder (`decoder_pretrained`, e.g. openai-community/gpt2, with its tokenizer; cross-attention is added).

    GPT-2 has no padding token: padding is its end-of-text token, and the targets mark padding by the attention
    mask, so the end-of-text that ends each caption is still learnt. Decoding starts from its BOS token.
    """

    model_class = VisionEncoderDecoderModel
    usage = """
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel
model = VisionEncoderDecoderModel.from_pretrained(DIR)
processor, tokenizer = AutoImageProcessor.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)
ids = model.generate(pixel_values=processor(images=image, return_tensors="pt").pixel_values)
caption = tokenizer.decode(ids[0], skip_special_tokens=True).strip()
"""

    def __init__(self, encoder_pretrained: str | None, decoder_pretrained: str | None, **kwargs):
        """With `pretrained` null: the image encoder and the text decoder to assemble (hub ids or folders)."""
        super().__init__(**kwargs)
        # The decoder reads the ViT's hidden states, never its pooled output: the pooler gets no gradient, and DDP
        # stops on parameters "not used in producing the loss" unless they are frozen.
        if getattr(self.model.encoder, "pooler", None) is not None:
            self.model.encoder.pooler.requires_grad_(False)

    def load_pretrained_parts(self):
        pretrained, encoder, decoder = (
            self.hparams.get(k) for k in ("pretrained", "encoder_pretrained", "decoder_pretrained")
        )
        if pretrained:
            return self.load_dir(pretrained)
        if not (encoder and decoder):
            raise UserError(
                "set model.pretrained (an image-captioning VisionEncoderDecoder checkpoint), or both "
                "model.encoder_pretrained and model.decoder_pretrained"
            )

        def assemble(_, local_files_only):
            # The decoder config is given with its cross-attention switched on: transformers 5's GPT2Config has
            # no is_decoder attribute for from_encoder_decoder_pretrained to read.
            decoder_config = AutoConfig.from_pretrained(decoder, local_files_only=local_files_only)
            decoder_config.is_decoder = decoder_config.add_cross_attention = True
            return VisionEncoderDecoderModel.from_encoder_decoder_pretrained(
                encoder,
                decoder,
                encoder_local_files_only=local_files_only,
                decoder_local_files_only=local_files_only,
                decoder_config=decoder_config,
            )

        # The processor and tokenizer first: a missing encoder or decoder is an error naming its own key.
        processor = load_offline(AutoImageProcessor.from_pretrained, encoder, "model.encoder_pretrained")
        tokenizer = load_offline(AutoTokenizer.from_pretrained, decoder, "model.decoder_pretrained")
        model = load_offline(
            assemble,
            f"{encoder} + {decoder}",
            "model.encoder_pretrained/decoder_pretrained",
            download=f"{encoder} {decoder}",
        )
        return model, processor, tokenizer

    def prepare_special_tokens(self) -> None:
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        ids = {
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
            "decoder_start_token_id": self.tokenizer.bos_token_id,
            "bos_token_id": self.tokenizer.bos_token_id,
        }
        for config in (self.model.config, self.model.generation_config):
            for name, value in ids.items():
                setattr(config, name, value)

    def vision_tower(self) -> torch.nn.Module:
        return self.model.encoder

    def logits_and_targets(self, batch: CaptionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        eos = self.tokenizer.eos_token
        text = self.tokenizer(
            [caption + eos for caption in self.caption_texts(batch)],
            padding="longest",
            truncation=True,
            max_length=self.hparams.max_caption_tokens,
            return_tensors="pt",
        ).to(self.device)
        targets = text.input_ids.masked_fill(text.attention_mask == 0, IGNORE)
        decoder_input_ids = shift_tokens_right(
            targets, self.model.config.pad_token_id, self.model.config.decoder_start_token_id
        )
        logits = self.model(pixel_values=batch.images, decoder_input_ids=decoder_input_ids).logits
        return logits, targets  # the decoder inputs are the targets shifted right: already aligned

    def generate_ids(self, images: torch.Tensor, generation_config=None) -> torch.Tensor:
        return self.model.generate(
            pixel_values=images, generation_config=generation_config or self.model.generation_config
        )

    def decoder_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """`ids` as generate returns them: the decoder's start token, then the caption."""
        return ids, 1

    def decoder_logits(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images, decoder_input_ids=ids).logits
