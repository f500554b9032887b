"""BLIP captioner (Li et al. 2022): transformers' BlipForConditionalGeneration, fine-tuned as in BLIP's COCO recipe."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BlipForConditionalGeneration, BlipProcessor

from datamodules.batches import CaptionBatch
from lightning_modules.captioning.hf import IGNORE, HFCaptioner


class BLIPCaptioner(HFCaptioner):
    """Captions are learnt and generated after `prompt` ("a picture of "), as in salesforce/BLIP:

    - training text = prompt + caption, tokenised with [CLS] replaced by the decoder's BOS ([DEC]) as `generate`
      does; the prompt tokens and padding are -100 in the targets, so only the caption is learnt;
    - generation starts from the same prompt and the caption is what follows it.
    """

    model_class = BlipForConditionalGeneration
    # BLIP's generate delegates to its text decoder, which does not read generation_config.json: pass it on.
    usage = """
from transformers import BlipForConditionalGeneration, BlipProcessor, pipeline
model, processor = BlipForConditionalGeneration.from_pretrained(DIR), BlipProcessor.from_pretrained(DIR)
inputs = processor(images=image, text={prompt!r}, return_tensors="pt")
ids = model.generate(**inputs, generation_config=model.generation_config)[0, inputs.input_ids.shape[1] - 1:]
caption = processor.decode(ids, skip_special_tokens=True).strip()
# or with transformers' pipeline:
pipe = pipeline("image-text-to-text", model=DIR)
caption = pipe(image, text={prompt!r}, return_full_text=False,
               generate_kwargs={{"generation_config": pipe.model.generation_config}})[0]["generated_text"].strip()
"""

    def __init__(self, pretrained: str, prompt: str, **kwargs):
        """`pretrained`: a BLIP captioning checkpoint (hub id in the Hugging Face cache, or a save_pretrained folder);
        `prompt`: what captions follow, in training and generation (its tokens are masked out of the loss)."""
        super().__init__(pretrained=pretrained, **kwargs)

    def save_processor(self, directory: Path) -> None:
        BlipProcessor(self.image_processor, self.tokenizer).save_pretrained(directory)

    def vision_tower(self) -> torch.nn.Module:
        return self.model.vision_model

    def prompt_ids(self, batch_size: int) -> torch.Tensor:
        """[CLS] prompt [SEP], once per image."""
        ids = self.tokenizer(self.hparams.prompt, return_tensors="pt").input_ids
        return ids.repeat(batch_size, 1).to(self.device)

    def logits_and_targets(self, batch: CaptionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.tokenizer(
            [self.hparams.prompt + caption for caption in self.caption_texts(batch)],
            padding="longest",
            truncation=True,
            max_length=self.hparams.max_caption_tokens,
            return_tensors="pt",
        ).to(self.device)
        input_ids = text.input_ids.clone()
        input_ids[:, 0] = self.model.config.text_config.bos_token_id
        targets = input_ids.masked_fill(text.attention_mask == 0, IGNORE)
        targets[:, : self.prompt_ids(1).shape[1] - 1] = IGNORE  # BOS and the prompt words ([SEP] is not in it)
        logits = self.model(pixel_values=batch.images, input_ids=input_ids, attention_mask=text.attention_mask).logits
        return logits[:, :-1], targets[:, 1:]  # position t predicts token t + 1

    def generate_ids(self, images: torch.Tensor, generation_config=None) -> torch.Tensor:
        prompt = self.prompt_ids(len(images))
        # BLIP's generate drops the prompt's [SEP] and sets BOS; the output starts with those prompt tokens.
        # Its text decoder has a generation config of its own: the model's is passed on explicitly.
        ids = self.model.generate(
            pixel_values=images, input_ids=prompt, generation_config=generation_config or self.model.generation_config
        )
        return ids[:, prompt.shape[1] - 1 :]

    def decoder_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """BOS and the prompt's words (what generate starts from: [CLS] made BOS, [SEP] dropped), then `ids`."""
        prefix = self.prompt_ids(len(ids))[:, :-1].to(ids.device)
        prefix[:, 0] = self.model.config.text_config.bos_token_id
        return torch.cat([prefix, ids], 1), prefix.shape[1]

    def decoder_logits(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images, input_ids=ids).logits
