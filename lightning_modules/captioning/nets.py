"""Networks of the CNN-RNN captioners: image encoders, Bahdanau attention and the RNN decoder."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchvision import models

from framework.errors import UserError
from framework.schema import Fraction, PositiveFloat, PositiveInt
from framework.weights import imagenet_state_dict


class SmallCNN(nn.Sequential):
    """Four conv-BN-ReLU blocks, three of them halving the resolution: a fast encoder for CPU demos."""

    def __init__(self, width: int = 32):
        channels = [3, width, 2 * width, 4 * width, 8 * width]
        blocks = []
        for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
            block = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            blocks.append(nn.Sequential(*block, nn.MaxPool2d(2)) if i < 3 else nn.Sequential(*block))
        super().__init__(*blocks)
        self.out_channels = channels[-1]


class ImageEncoder(nn.Module):
    """Image [B, 3, H, W] -> feature map [B, C, h, w]; `finetune` picks what trains (all, last stage, none)."""

    def __init__(
        self,
        name: Literal["small_cnn", "resnet50", "densenet201"],
        pretrained: bool | str,
        finetune: Literal["all", "last", "none"],
        width: PositiveInt,
        lr: PositiveFloat | None,
    ):
        """`pretrained`: ImageNet weights from the torch cache (true), from a .pth file (its path), or none (false);
        `width`: small_cnn's first channels; `lr`: the encoder's learning rate (null: the optimizer's)."""
        super().__init__()
        if name == "small_cnn":
            if pretrained:
                raise UserError("small_cnn has no pretrained weights: set model.encoder.pretrained=false")
            self.body = SmallCNN(width)
            self.out_channels, stages = self.body.out_channels, [self.body[-1]]
        else:
            backbone = getattr(models, name)(weights=None)
            if pretrained:
                backbone.load_state_dict(imagenet_state_dict(name, pretrained, "model.encoder.pretrained"))
            if name == "resnet50":
                self.body = nn.Sequential(*list(backbone.children())[:-2])  # drop avgpool and fc
                self.out_channels, stages = 2048, [backbone.layer4]
            else:
                self.body = nn.Sequential(backbone.features, nn.ReLU(inplace=True))
                self.out_channels, stages = 1920, [backbone.features.denseblock4, backbone.features.norm5]
        if finetune != "all":
            self.body.requires_grad_(False)
            if finetune == "last":
                for stage in stages:
                    stage.requires_grad_(True)
        self.finetune, self.lr = finetune, lr

    def train(self, mode: bool = True):
        super().train(mode)
        if self.finetune == "none":  # a frozen encoder also keeps its BatchNorm statistics
            self.body.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


class BahdanauAttention(nn.Module):
    """Additive attention over the encoder grid (Show, Attend and Tell, eq. 4-6)."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1, bias=False)  # a bias would cancel in the softmax

    def forward(self, features, projected, hidden):
        """features [B, N, C] and their projection [B, N, A]; hidden [B*K, H] holds K hypotheses per image
        (K > 1 in beam search), which share the image's memory instead of K copies of it."""
        batch, locations = features.shape[:2]
        hidden_term = self.hidden_proj(hidden).view(batch, -1, 1, projected.shape[-1])
        # score(tanh(x)) computed as 2 w.sigmoid(2x): tanh(x) = 2 sigmoid(2x) - 1, and the constant
        # -sum(w) cancels in the softmax. Same function, several times faster on CPUs, where
        # tanh over the [B, K, N, A] tensor dominates a decoding step.
        squashed = torch.sigmoid((projected.unsqueeze(1) + hidden_term).mul_(2))
        alpha = (2 * torch.matmul(squashed, self.score.weight.squeeze(0))).softmax(dim=-1)  # [B, K, N]
        context = torch.bmm(alpha, features)  # [B, K, C]
        return context.view(-1, features.shape[-1]), alpha.view(-1, locations)


class RNNDecoder(nn.Module):
    """LSTM or GRU word decoder, with soft attention over the grid or with the pooled image as initial state.

    `start` turns encoder features into (memory, state); `step` advances one word. Teacher forcing,
    greedy and beam search all go through `step`, so they decode the same model.
    """

    def __init__(
        self,
        vocab_size: PositiveInt,
        feature_dim: PositiveInt,
        rnn: Literal["lstm", "gru"],
        attention: bool,
        embed_dim: PositiveInt,
        hidden_dim: PositiveInt,
        attention_dim: PositiveInt,
        dropout: Fraction,
    ):
        """`vocab_size` and `feature_dim` come from the captioner (its vocabulary, its encoder's channels); the rest
        from its `decoder` settings. `attention`: soft attention over the grid, else the pooled image as the initial
        state."""
        super().__init__()
        self.rnn = rnn
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.attention = BahdanauAttention(feature_dim, hidden_dim, attention_dim) if attention else None
        self.gate = nn.Linear(hidden_dim, feature_dim) if attention else None
        cell = nn.LSTMCell if rnn == "lstm" else nn.GRUCell
        self.cell = cell(embed_dim + (feature_dim if attention else 0), hidden_dim)
        self.init_states = nn.ModuleList(nn.Linear(feature_dim, hidden_dim) for _ in range(2 if rnn == "lstm" else 1))
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def start(self, features: torch.Tensor):
        """Memory (features, their attention projection) and the initial state from the mean feature."""
        pooled = features.mean(dim=1)
        state = tuple(torch.tanh(layer(pooled)) for layer in self.init_states)
        projected = self.attention.feature_proj(features) if self.attention is not None else features[:, :0]
        return (features, projected), state

    def step(self, tokens: torch.Tensor, memory, state):
        """One word: logits [B, V], the next state and the attention weights [B, N] (None without attention)."""
        inputs, alpha = self.embedding(tokens), None
        if self.attention is not None:
            features, projected = memory
            context, alpha = self.attention(features, projected, state[0])
            inputs = torch.cat([inputs, torch.sigmoid(self.gate(state[0])) * context], dim=-1)
        if self.rnn == "lstm":
            state = self.cell(inputs, state)
        else:
            state = (self.cell(inputs, state[0]),)
        return self.output(self.dropout(state[0])), state, alpha

    def forward(self, features: torch.Tensor, inputs: torch.Tensor):
        """Teacher forcing: logits [B, T, V] and attention weights [B, T, N] (None without attention)."""
        memory, state = self.start(features)
        logits, alphas = [], []
        for t in range(inputs.shape[1]):
            step_logits, state, alpha = self.step(inputs[:, t], memory, state)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, 1), (torch.stack(alphas, 1) if self.attention is not None else None)
