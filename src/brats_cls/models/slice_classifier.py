"""The slice classification head shared by both networks (paper section 2.3, Tables 2 and 3).

It reads the concatenated feature maps that feed the final segmentation layer and predicts, for each
axial slice, whether it holds whole tumour, tumour core and enhancing tumour (three logits).

    conv block  (conv3, GN, ReLU)            (B, Cin, d, H, W)  -> (B, Cconv, d, H, W)
    pool        mean over H and W            (B, Cconv, d, H, W) -> (B, Cconv, d)
    upsample    tconv (k3, s2), GN, ReLU     (B, Cconv, d)       -> (B, Cconv, 2d)   BiFPN only
    lstm        stacked BiLSTM               (B, Cconv, D)       -> (B, 2*hidden, D)
    fc          conv1d, kernel 1             (B, 2*hidden, D)    -> (B, 3, D)

Decisions where the paper is silent:

* Table 2's "tconv3d3" acts on the pooled ``(C, d)`` slice features, so it is a 1-D transposed
  convolution along D (kernel 3, stride 2, padding 1, output padding 1: exactly doubles d); a 3x3x3
  kernel on a 1x1 in-plane map would only use its centre column anyway;
* "Bi-LSTM with dropout" is PyTorch's inter-layer LSTM dropout (none after the last layer; none
  at all for a single layer); default rate 0.1;
* every submodule is a named attribute so that tests can hook each row of the tables.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvNormAct, check_groups, check_positive_int, check_rate, group_norm


class SlicePool(nn.Module):
    """Global average pooling over the in-plane axes: ``(B, C, D, H, W) -> (B, C, D)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(3, 4))


class DepthUpsampleBlock(nn.Sequential):
    """Transposed-conv block along D: ``(B, C, d) -> (B, C, 2d)`` (tconv k3 s2, GN, ReLU)."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__(
            nn.ConvTranspose1d(channels, channels, 3, stride=2, padding=1, output_padding=1, bias=False),
            group_norm(channels, norm_groups),
            nn.ReLU(inplace=True),
        )


class BiLSTM(nn.Module):
    """Stacked bidirectional LSTM over slices: ``(B, C, D) -> (B, 2*hidden, D)``."""

    def __init__(self, in_channels: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(in_channels, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.lstm(x.transpose(1, 2))  # (B, C, D) -> (B, D, C) -> (B, D, 2*hidden)
        return sequence.transpose(1, 2)  # -> (B, 2*hidden, D)


class SliceClassifier(nn.Module):
    """Slice classification head.

    Args (plain values):
        in_channels: channels of the concatenated feature map (1024 BiFPN, 128 UNet++ at paper size).
        conv_channels: output of the conv block (512 BiFPN, 256 UNet++).
        lstm_hidden: hidden size per direction (512 BiFPN, 256 UNet++); output has twice this.
        lstm_layers: stacked BiLSTM layers (2 BiFPN, 3 UNet++).
        lstm_dropout: dropout between LSTM layers, default 0.1.
        norm_groups: GroupNorm groups, default 8.
        upsample_depth: double the D axis with a transposed-conv block (BiFPN: features are at half
            the input size), default False.
        out_channels: slice logits per slice, default 3 (WT, TC, ET).
    """

    def __init__(self, in_channels: int, conv_channels: int, lstm_hidden: int, lstm_layers: int,
                 lstm_dropout: float = 0.1, norm_groups: int = 8, upsample_depth: bool = False,
                 out_channels: int = 3):
        super().__init__()
        check_positive_int("classifier in_channels", in_channels)
        check_groups("classifier_channels", conv_channels, norm_groups)
        check_positive_int("lstm_hidden", lstm_hidden)
        check_positive_int("lstm_layers", lstm_layers)
        check_rate("lstm_dropout", lstm_dropout)
        check_positive_int("out_channels", out_channels)
        self.conv_block = ConvNormAct(in_channels, conv_channels, norm_groups)
        self.pool = SlicePool()
        self.upsample = DepthUpsampleBlock(conv_channels, norm_groups) if upsample_depth else nn.Identity()
        self.lstm = BiLSTM(conv_channels, lstm_hidden, lstm_layers, lstm_dropout)
        self.fc = nn.Conv1d(2 * lstm_hidden, out_channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.conv_block(features)  # (B, Cin, d, H, W) -> (B, Cconv, d, H, W)
        x = self.pool(x)  # -> (B, Cconv, d)
        x = self.upsample(x)  # -> (B, Cconv, D), D = 2d for BiFPN, d for UNet++
        x = self.lstm(x)  # -> (B, 2*hidden, D)
        return self.fc(x)  # -> (B, 3, D)
