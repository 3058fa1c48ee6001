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
* **In-plane windows** (``window``): the mean over H x W is taken over windows of the training crop's
  in-plane size, not over the whole plane, so that at inference the head sees what it saw in
  training: a tumour's share of the mean must not shrink with the size of the plane (evidence:
  docs/design.md#slice-classifier-windows). Along each in-plane axis of size n the windows are the
  fewest of size w that cover it, ceil(n / w), spread evenly from 0 to n - w (a plane no larger than
  the window is one window: training crops always are); each window goes through the whole head on its
  own (conv block with its GroupNorm statistics, mean, BiLSTM, FC: exactly what a training crop's
  features go through), and a slice's logit is the **maximum over the windows**: the slice holds the
  region when some part of it does.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvNormAct, check_groups, check_positive_int, check_rate, group_norm


def window_starts(size: int, window: int) -> list[int]:
    """Starts of the fewest windows of ``window`` that cover ``size``, spread evenly (module docstring)."""
    if size <= window:
        return [0]
    count = -(-size // window)
    return [round(index * (size - window) / (count - 1)) for index in range(count)]


def split_windows(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """In-plane windows as a batch: ``(B, C, D, H, W) -> (n * B, C, D, h, w)``, window-major (module
    docstring)."""
    crops = [x[..., h : h + window[0], w : w + window[1]]
             for h in window_starts(x.shape[3], window[0]) for w in window_starts(x.shape[4], window[1])]
    return crops[0] if len(crops) == 1 else torch.cat(crops)


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
        window: in-plane pooling window ``(h, w)`` on the feature grid (keyword, no default: the
            networks derive it from their ``classifier_window``).
    """

    def __init__(self, in_channels: int, conv_channels: int, lstm_hidden: int, lstm_layers: int,
                 lstm_dropout: float = 0.1, norm_groups: int = 8, upsample_depth: bool = False,
                 out_channels: int = 3, *, window: tuple[int, int]):
        super().__init__()
        check_positive_int("classifier in_channels", in_channels)
        check_groups("classifier_channels", conv_channels, norm_groups)
        check_positive_int("lstm_hidden", lstm_hidden)
        check_positive_int("lstm_layers", lstm_layers)
        check_rate("lstm_dropout", lstm_dropout)
        check_positive_int("out_channels", out_channels)
        self.conv_block = ConvNormAct(in_channels, conv_channels, norm_groups)
        self.window = (check_positive_int("window", window[0]), check_positive_int("window", window[1]))
        self.pool = SlicePool()
        self.upsample = DepthUpsampleBlock(conv_channels, norm_groups) if upsample_depth else nn.Identity()
        self.lstm = BiLSTM(conv_channels, lstm_hidden, lstm_layers, lstm_dropout)
        self.fc = nn.Conv1d(2 * lstm_hidden, out_channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch = features.shape[0]
        x = split_windows(features, self.window)  # (B, Cin, d, H, W) -> (n * B, Cin, d, h, w)
        x = self.conv_block(x)  # -> (n * B, Cconv, d, h, w)
        x = self.pool(x)  # -> (n * B, Cconv, d)
        x = self.upsample(x)  # -> (n * B, Cconv, D), D = 2d for BiFPN, d for UNet++
        x = self.lstm(x)  # -> (n * B, 2*hidden, D)
        x = self.fc(x)  # -> (n * B, 3, D)
        return x.unflatten(0, (-1, batch)).amax(dim=0)  # the maximum over the windows -> (B, 3, D)
