"""Run a Hugging Face speech encoder with any subset of its layers, chosen per example.

Families: WavLM, HuBERT, wav2vec 2.0 (waveform in, CNN front end) and Whisper (waveform in, log-mel
and two convolutions as front end, see ``whisper.py``; the decoder is not the runner's business).

The HF forward runs every layer for every example. ``LayerRunner`` re-uses the HF modules but owns
the loop, so that:

* at inference (``keep`` is a bool mask ``[B, L]``) each layer runs only on the rows that keep it,
  gathered with ``index_select`` and written back with ``index_copy`` — real compute saving, with a
  different mask per example in one batch;
* in training (``gates`` is a float tensor ``[B, L]``) each layer is blended,
  ``h + g * (layer(h) - h)``, so gradients reach whatever produced the gates (a selector);
* any layer can be skipped, WavLM's layer 0 included: WavLM keeps its relative position bias in
  layer 0 and hands it on, so the runner computes that bias once itself and gives it to every layer.

With an all-ones mask the result equals the HF model's ``last_hidden_state``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask

from . import whisper
from .backbone import family_of, whisper_log_mel
from .compat import check_supported

# HF's WavLM attention hands torch a bool padding mask beside its float position bias, and torch warns
# about the mixed types on every padded batch; the result is right (the bias is added, padded keys are
# masked), and the warning is noise to every command that runs a padded WavLM.
warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask is deprecated",
                        category=UserWarning)


@dataclass
class FrontEnd:
    """What the always-run part of the model produces for a batch.

    ``hidden`` enters the first encoder layer; ``features`` (projected CNN output, before the
    positional convolution) is what a selector may look at; ``frame_mask`` marks real (unpadded)
    frames, or is None when nothing is padded.
    """

    hidden: Tensor
    features: Tensor
    frame_mask: Tensor | None

    def lengths(self) -> Tensor:
        """Real frames of each input ``[B]`` (long, on the front end's device)."""
        return real_frames(self.hidden, self.frame_mask)

    def select(self, rows: Tensor) -> "FrontEnd":
        mask = None if self.frame_mask is None else self.frame_mask[rows]
        return FrontEnd(self.hidden[rows], self.features[rows], mask)


def real_frames(hidden: Tensor, frame_mask: Tensor | None) -> Tensor:
    """Real frames of each input ``[B]`` (long, on ``hidden``'s device) of layer inputs ``hidden``
    ``[B, T, D]`` and their ``frame_mask`` ``[B, T]`` (None: nothing padded, every input has T)."""
    if frame_mask is None:
        return torch.full((hidden.shape[0],), hidden.shape[1], dtype=torch.long, device=hidden.device)
    return frame_mask.sum(1)


def normalize_waveform(waveform: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Zero mean, unit variance per example over its real samples (what HF feature extractors do)."""
    if attention_mask is None:
        mean = waveform.mean(dim=-1, keepdim=True)
        var = waveform.var(dim=-1, keepdim=True, unbiased=False)
        return (waveform - mean) / torch.sqrt(var + 1e-7)
    m = attention_mask.to(waveform.dtype)
    n = m.sum(-1, keepdim=True).clamp(min=1)
    mean = (waveform * m).sum(-1, keepdim=True) / n
    var = (((waveform - mean) * m) ** 2).sum(-1, keepdim=True) / n
    return ((waveform - mean) / torch.sqrt(var + 1e-7)) * m


class LayerRunner(nn.Module):
    """Front end + encoder layers of an HF WavLM / HuBERT / wav2vec 2.0 / Whisper model, layer by layer.

    Whisper only: ``pad_to_window`` pads every clip to Whisper's 30 s window (what the HF encoder
    requires, and the default: unpadded clips make the stock decoder loop, WER 350% vs 9% on
    English prompts); False runs each clip at its own length plus ``tail_s`` seconds of silence,
    with the learned positions sliced (~10x less encoder time for a 3 s clip).
    """

    def __init__(self, backbone: nn.Module, pad_to_window: bool = True, tail_s: float = 0.0):
        super().__init__()
        check_supported(backbone.config, type(backbone).__name__)  # refuse what the loop below cannot reproduce
        self.backbone = backbone
        self.family = family_of(backbone)
        self.encoder = backbone.model.encoder if self.family == "whisper" else backbone.encoder
        self.layers = self.encoder.layers
        self.stable_layer_norm = bool(getattr(backbone.config, "do_stable_layer_norm", False))
        self.pad_to_window = pad_to_window
        self.tail_s = tail_s
        self.log_mel = whisper_log_mel(backbone) if self.family == "whisper" else None
        # Optional affine stand-ins for skipped layers (``skip_maps.SkipMaps``, fitted on a frozen
        # pretrained encoder); None: a skipped layer passes its input through unchanged.
        self.skip_maps: nn.Module | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    # ---- front end: CNN, projection, positional convolution (always runs) -------------------

    def front_end(self, input_values: Tensor, attention_mask: Tensor | None = None) -> FrontEnd:
        """input_values [B, samples] at 16 kHz (normalised for the SSL families, raw for Whisper);
        attention_mask [B, samples] (1 = real sample) or None."""
        if self.family == "whisper":
            return self._whisper_front_end(input_values, attention_mask)
        bb, enc = self.backbone, self.encoder
        extract = self._cnn(input_values, attention_mask)
        frame_mask = None
        if attention_mask is not None:
            frame_mask = bb._get_feature_vector_attention_mask(extract.shape[1], attention_mask).bool()
            if bool(frame_mask.all()):
                frame_mask = None  # nothing padded: same fast path as the HF model
        features = bb.feature_projection(extract)
        if isinstance(features, tuple):  # WavLM / wav2vec2 also return the normalised CNN output
            features = features[0]
        hidden = features
        if frame_mask is not None:
            hidden = hidden.masked_fill(~frame_mask.unsqueeze(-1), 0.0)
        hidden = hidden + enc.pos_conv_embed(hidden)
        if not self.stable_layer_norm:
            hidden = enc.layer_norm(hidden)
        hidden = enc.dropout(hidden)
        return FrontEnd(hidden=hidden, features=features, frame_mask=frame_mask)

    def _cnn(self, input_values: Tensor, attention_mask: Tensor | None) -> Tensor:
        """CNN features [B, frames, channels]. A group-norm CNN (``feat_extract_norm="group"``, as in
        wav2vec 2.0 base, HuBERT base and WavLM) normalises each channel over the whole input, padding
        included, so a padded clip's features would depend on the longest clip of its batch (0.1-0.2
        points of WER on the synthetic corpus). Outside training (evaluation, inference, the cached front
        ends of stages 2-3) it runs each padded clip at its own length instead, as a device runs one clip,
        and pads the outputs with zeros (masked frames). Training keeps the batched CNN: per clip, a
        stage-1 epoch took twice as long (34 s against 17 s on the fleet-asr corpus), and its length-sorted
        batches carry little padding."""
        cnn = self.backbone.feature_extractor
        if self.training or attention_mask is None or self.backbone.config.feat_extract_norm != "group":
            return cnn(input_values).transpose(1, 2)
        lengths = attention_mask.sum(-1).tolist()
        if min(lengths) >= input_values.shape[1]:  # nothing padded
            return cnn(input_values).transpose(1, 2)
        frames = int(self.backbone._get_feat_extract_output_lengths(input_values.shape[1]))
        out = input_values.new_zeros(len(lengths), frames, self.backbone.config.conv_dim[-1])
        for i, n in enumerate(lengths):
            clip = cnn(input_values[i : i + 1, : max(int(n), 400)]).transpose(1, 2)[0]  # 400: the CNN's receptive field
            out[i, : clip.shape[0]] = clip[:frames]
        return out

    def _whisper_front_end(self, waveform: Tensor, attention_mask: Tensor | None) -> FrontEnd:
        mel, mel_frames = whisper.batch_log_mel(
            self.log_mel, waveform, attention_mask, self.pad_to_window, self.tail_s
        )
        features, frame_mask = whisper.conv_front_end(self.encoder, mel, mel_frames)
        hidden = whisper.add_positions(self.encoder, features)
        hidden = nn.functional.dropout(hidden, p=self.encoder.dropout, training=self.training)
        return FrontEnd(hidden=hidden, features=features, frame_mask=frame_mask)

    # ---- encoder layers under a mask --------------------------------------------------------

    def _layer_context(self, hidden: Tensor, frame_mask: Tensor | None):
        """Per-batch inputs every layer needs: the attention mask and (WavLM) the position bias."""
        if self.family == "wavlm":
            t = hidden.shape[1]
            bias = self.layers[0].attention.compute_bias(t, t)  # [heads, T, T]
            return frame_mask, bias
        mask4d = create_bidirectional_mask(
            config=self.backbone.config, inputs_embeds=hidden, attention_mask=frame_mask
        )
        return mask4d, None

    def _run_layer(self, index: int, hidden: Tensor, mask, bias: Tensor | None) -> Tensor:
        layer = self.layers[index]
        if bias is None:
            return layer(hidden, attention_mask=mask)
        n, t = hidden.shape[0], hidden.shape[1]
        batch_bias = bias.unsqueeze(0).expand(n, -1, -1, -1).reshape(n * bias.shape[0], t, t)
        out, _ = layer(hidden, attention_mask=mask, position_bias=batch_bias, index=index)
        return out

    def after_layers(self) -> list[nn.Module]:
        """The modules applied after the last encoder layer, in order: the final layer norm (pre-norm
        encoders and Whisper) and the adapter (when the checkpoint has one)."""
        modules = [self.encoder.layer_norm] if self.stable_layer_norm or self.family == "whisper" else []
        if getattr(self.backbone, "adapter", None) is not None:
            modules.append(self.backbone.adapter)
        return modules

    def _finish(self, hidden: Tensor) -> Tensor:
        for module in self.after_layers():
            hidden = module(hidden)
        return hidden

    def run_layers(self, front: FrontEnd, keep: Tensor | None = None) -> Tensor:
        """Hard mask ``keep`` [B, L] (bool; None = all layers): each layer runs only where kept;
        where it is skipped, its skip map (if any) stands in for it."""
        hidden = front.hidden
        mask, bias = self._layer_context(hidden, front.frame_mask)
        batch = hidden.shape[0]
        for i in range(self.num_layers):
            if keep is None:
                hidden = self._run_layer(i, hidden, mask, bias)
                continue
            rows = keep[:, i].nonzero().squeeze(1)
            if rows.numel() == batch:
                hidden = self._run_layer(i, hidden, mask, bias)
                continue
            new = hidden
            if rows.numel():
                sub_mask = None if mask is None else mask.index_select(0, rows)
                new = new.index_copy(0, rows, self._run_layer(i, hidden.index_select(0, rows), sub_mask, bias))
            if self.skip_maps is not None:
                skipped = (~keep[:, i]).nonzero().squeeze(1)
                new = new.index_copy(0, skipped, self.skip_maps(i, hidden.index_select(0, skipped)))
            hidden = new
        return self._finish(hidden)

    def run_with_exits(self, front: FrontEnd, exits: Callable[[Tensor, Tensor | None], Tensor]) -> tuple[Tensor, Tensor]:
        """Layers in order, each on the inputs still running, with an exit after every layer (early exit).

        After each layer but the last, ``exits(finished [b, T, D], frame_mask [b, T] or None)`` gets the
        running inputs' states (passed through the final modules, as a head sees them) and says which
        of them stop there (bool ``[b]``). Returns each input's state where it stopped ``[B, T, D]`` and
        its depth ``[B]`` (layers run, 1..L)."""
        batch, num_layers = front.hidden.shape[0], self.num_layers
        mask, bias = self._layer_context(front.hidden, front.frame_mask)
        out: Tensor | None = None  # allocated at the first exit: the final modules (an adapter) may change shape
        depth = torch.full((batch,), num_layers, dtype=torch.long, device=front.hidden.device)
        rows = torch.arange(batch, device=front.hidden.device)  # the inputs still running
        hidden = front.hidden
        for i in range(num_layers):
            sub_mask = mask if mask is None or len(rows) == batch else mask.index_select(0, rows)
            hidden = self._run_layer(i, hidden, sub_mask, bias)
            finished = self._finish(hidden)
            frame_mask = None if front.frame_mask is None else front.frame_mask.index_select(0, rows)
            stop = torch.ones(len(rows), dtype=torch.bool, device=hidden.device) if i == num_layers - 1 else exits(finished, frame_mask)
            if out is None:
                out = finished.new_empty((batch, *finished.shape[1:]))
            out[rows[stop]] = finished[stop]
            depth[rows[stop]] = i + 1
            rows, hidden = rows[~stop], hidden[~stop]
            if not len(rows):
                break
        return out, depth

    @torch.no_grad()
    def run_layer_sets(self, front: FrontEnd, sets: Tensor, max_rows: int = 8) -> Tensor:
        """One clip (``front`` of batch 1) under many layer sets ``sets`` [C, L] (bool): [C, T, D].

        Equal to ``run_layers`` on the clip repeated C times with ``keep=sets``, but sets that agree
        on layers 0..i share the state after layer i, so each distinct kept prefix runs its layer
        once: the 35 sets of 3 or 4 of 6 layers cost 49 layer passes instead of 120. At most
        ``max_rows`` states run through a layer at a time (memory on 30 s windows).
        """
        if front.hidden.shape[0] != 1:
            raise ValueError(f"run_layer_sets takes one clip, got a batch of {front.hidden.shape[0]}")
        states: dict[tuple[bool, ...], Tensor] = {(): front.hidden}
        rows = [tuple(bool(x) for x in s) for s in sets.tolist()]
        for i in range(self.num_layers):
            prefixes = sorted({r[: i + 1] for r in rows})
            new: dict[tuple[bool, ...], Tensor] = {}
            for kept in (True, False):
                group = [p for p in prefixes if p[-1] == kept]
                if not kept and self.skip_maps is None:
                    new.update({p: states[p[:-1]] for p in group})
                    continue
                for start in range(0, len(group), max_rows):
                    chunk = group[start : start + max_rows]
                    hidden = torch.cat([states[p[:-1]] for p in chunk])
                    if kept:
                        frame_mask = None if front.frame_mask is None else front.frame_mask.expand(len(chunk), -1)
                        mask, bias = self._layer_context(hidden, frame_mask)
                        out = self._run_layer(i, hidden, mask, bias)
                    else:
                        out = self.skip_maps(i, hidden)
                    new.update({p: out[j : j + 1] for j, p in enumerate(chunk)})
            states = new
        return self._finish(torch.cat([states[r] for r in rows]))

    def run_layers_gated(self, front: FrontEnd, gates: Tensor) -> Tensor:
        """Soft/straight-through gates [B, L]: every layer runs, blended so gradients reach gates."""
        hidden = front.hidden
        mask, bias = self._layer_context(hidden, front.frame_mask)
        for i in range(self.num_layers):
            out = self._run_layer(i, hidden, mask, bias)
            skipped = hidden if self.skip_maps is None else self.skip_maps(i, hidden)
            g = gates[:, i].to(hidden.dtype).view(-1, 1, 1)
            hidden = skipped + g * (out - skipped)
        return self._finish(hidden)

    def forward(self, input_values: Tensor, attention_mask: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        return self.run_layers(self.front_end(input_values, attention_mask), keep)
