"""The ESS model: a causal LM, one extra [CLS] embedding row and a benign/malicious head.

Reading order: `ESSModel.forward` embeds the tokens (the [CLS] row substituted where the role
says CLS), builds the 4D mask from the token roles (`ess.masks`), runs the base decoder (`_decode`:
the prefix all rows share first, as one row), and reads the head off the [CLS] hidden state. LM
logits are computed only where they are needed.

Checkpoint layout (`save_pretrained`), safetensors only:
    ess_config.json          ESSConfig: base reference, [CLS] id, λ, adapter kind, version
    ess_head.safetensors     cls_embedding [hidden], head.weight [2, hidden], head.bias [2]
    adapter/                 peft LoRA adapter (adapter kind `lora`), or
    model/                   the full fine-tuned LM (adapter kind `full`)
    (adapter kind `merged`: a plain HF checkpoint with ESS beside it, see `ess.export`)
    tokenizer files          the base tokenizer with [CLS] added as a special token
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ESSConfig
from .hub import ModelNotFound, resolve_base
from .masks import Phase, Role, additive_mask, attention_allowed, position_ids

HEAD_FILE = "ess_head.safetensors"
CONFIG_FILE = "ess_config.json"


@dataclass
class ESSOutput:
    hidden_states: torch.Tensor
    """Last hidden states [b, n, hidden] (after the base's final norm)."""
    cls_logits: torch.Tensor
    """Head logits [b, 2] of the first [CLS] of each row; [sequences, 2], one per [CLS], for a packed batch."""
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    cls_loss: torch.Tensor | None = None

    @property
    def p_malicious(self) -> torch.Tensor:
        return self.cls_logits.float().softmax(-1)[:, 1]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class DtypeError(ValueError):
    """`$ESS_DTYPE` names no dtype ess loads models in."""


def native_dtype() -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 matrix units (AVX512-BF16, AMX); fp32 on other
    CPUs, where bf16 is emulated and slower than fp32."""
    if torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return torch.bfloat16
    return torch.float32


def default_dtype() -> torch.dtype:
    """The dtype base LMs load in: `$ESS_DTYPE` (bfloat16 or float32) where set, else `native_dtype()`."""
    name = os.environ.get("ESS_DTYPE")
    if not name:
        return native_dtype()
    if name not in DTYPES:
        raise DtypeError(f"ESS_DTYPE={name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(reference: str, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """Load a base LM and its tokenizer from a registered name, folder or hub id (in `dtype`,
    default `default_dtype()`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_base(reference)
    if dtype is None:
        dtype = default_dtype()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as error:
        raise ModelNotFound(f"{reference}: {error}") from error
    return lm, tokenizer


class ESSModel(nn.Module):
    share_prefix = True
    """Compute the prefix that every row of a batch shares once (`shared_prefix`); False: in every
    row, for tests and benchmarks."""

    def __init__(self, lm: nn.Module, tokenizer, config: ESSConfig, head_state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.config = config
        base = self.base_lm
        hidden = base.config.hidden_size
        embeddings = base.get_input_embeddings().weight
        self.vocab_rows = embeddings.shape[0]
        # A new token's row starts at the mean of the vocabulary's rows: inside the distribution
        # the first layer was trained on, with no bias toward any one token (transformers does the
        # same for tokens added by resize_token_embeddings). Both new parameters stay fp32 whatever
        # the base's dtype: they start from scratch with a high learning rate, whose updates a bf16
        # weight would round away.
        self.cls_embedding = nn.Parameter(embeddings.detach().float().mean(0).clone())
        self.head = nn.Linear(hidden, config.num_labels, dtype=torch.float32)
        if head_state is not None:
            self.cls_embedding.data.copy_(head_state["cls_embedding"])
            self.head.load_state_dict({"weight": head_state["head.weight"], "bias": head_state["head.bias"]})

    # ---- construction and persistence -------------------------------------------------------

    @classmethod
    def from_base(cls, base: str, adapter: str = "lora", dtype: torch.dtype | None = None, **config_fields) -> ESSModel:
        """A fresh ESS model over a base LM (`adapter`: `lora` or `full`)."""
        lm, tokenizer = load_causal_lm(base, dtype)
        config = ESSConfig(base_model=base, adapter=adapter, **config_fields)
        tokenizer.add_tokens([config.cls_token], special_tokens=True)
        config.cls_token_id = tokenizer.convert_tokens_to_ids(config.cls_token)
        if adapter == "lora":
            lm = _add_lora(lm, config)
        elif adapter != "full":
            raise ValueError(f"unknown adapter {adapter!r}: expected lora or full")
        return cls(lm, tokenizer, config).to(lm.device)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None, trainable: bool = False) -> ESSModel:
        """Load a checkpoint written by `save_pretrained`; a LoRA adapter loaded for inference
        (`trainable=False`) is merged (`merge_lora`)."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not (folder / CONFIG_FILE).exists():
            raise ModelNotFound(f"{folder}: not an ESS checkpoint (no {CONFIG_FILE})")
        config = ESSConfig.load(folder / CONFIG_FILE)
        tokenizer_folder = folder
        if config.adapter == "full":
            lm, _ = load_causal_lm(str(folder / "model"), dtype)
        elif config.adapter == "merged":  # written by `ess.export.export_merged`
            lm, _ = load_causal_lm(str(folder), dtype)
            tokenizer_folder = folder / "ess_tokenizer"
        else:
            from peft import PeftModel

            lm, _ = load_causal_lm(config.base_model, dtype)
            with _peft_reads_a_deprecated_property():
                lm = PeftModel.from_pretrained(lm, folder / "adapter", is_trainable=trainable)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        head_state = load_file(folder / HEAD_FILE)
        model = cls(lm, tokenizer, config, head_state).to(lm.device)
        if not trainable:
            model.merge_lora()
        return model

    def merge_lora(self) -> None:
        """Merge a LoRA adapter into the base weights for inference: the same function, one matrix
        product per layer instead of three. The adapter's own weights, which `save_pretrained`
        writes, are unchanged."""
        if self.config.adapter == "lora":
            self.lm.merge_adapter()

    def save_pretrained(self, folder: str | Path) -> None:
        if self.config.adapter == "merged":
            from .export import export_merged

            export_merged(self, folder)
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder / CONFIG_FILE)
        save_file(self.head_state(), folder / HEAD_FILE)
        if self.config.adapter == "lora":
            self.lm.save_pretrained(folder / "adapter")
        else:
            self.lm.save_pretrained(folder / "model")
            self.tokenizer.save_pretrained(folder / "model")
        self.tokenizer.save_pretrained(folder)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {
            "cls_embedding": self.cls_embedding.detach().contiguous().cpu(),
            "head.weight": self.head.weight.detach().contiguous().cpu(),
            "head.bias": self.head.bias.detach().contiguous().cpu(),
        }

    # ---- the parts of the base LM ------------------------------------------------------------

    @property
    def base_lm(self):
        """The causal LM (LoRA layers injected, if any) without the peft wrapper."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def decoder(self):
        return self.base_lm.get_decoder()

    @property
    def device(self) -> torch.device:
        return self.cls_embedding.device

    def verdict_logits(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """Head logits (fp32) of [CLS] hidden states [..., hidden]: benign, malicious."""
        return self.head(cls_hidden.to(self.head.weight.dtype)).float()

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits, soft-capped where the base caps them (Gemma-2)."""
        logits = self.base_lm.get_output_embeddings()(hidden)
        cap = getattr(self.base_lm.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    @property
    def context_limit(self) -> tuple[int | None, str]:
        """Longest sequence ([CLS] included) the model reads as its base would, and what sets it.

        A sliding-window layer would hide [CLS] (position 0) from tokens farther than the window:
        the ESS mask opens every layer to [CLS], so past the window the sliding layers would read
        what the base never did. Sequences are therefore bounded by the window too."""
        config = self.base_lm.config
        limit = getattr(config, "max_position_embeddings", None)
        window = sliding_window(config)
        if window is not None and (limit is None or window < limit):
            return window, f"sliding window of {window} tokens ([CLS] must stay inside every layer's window)"
        return limit, f"context of {limit} tokens"

    def check_length(self, n: int) -> None:
        """One clear error where a sequence of `n` tokens is longer than `context_limit`."""
        limit, what = self.context_limit
        if limit is not None and n > limit:
            raise SequenceTooLong(f"a sequence of {n} tokens exceeds the model's {what}")

    def embed(
        self, input_ids: torch.Tensor, roles: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the [CLS] row wherever the role is CLS (`inputs_embeds`, if given,
        replaces the lookup of `input_ids`: the gradient path of GCG)."""
        if inputs_embeds is None:
            # The [CLS] id may lie past the embedding matrix (it is never looked up there).
            safe_ids = input_ids.clamp(max=self.vocab_rows - 1)
            embeds = self.base_lm.get_input_embeddings()(safe_ids)
        else:
            embeds = inputs_embeds
        is_cls = (roles == Role.CLS)[..., None]
        return torch.where(is_cls, self.cls_embedding.to(embeds.dtype), embeds)

    # ---- the forward pass --------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        roles: torch.Tensor,
        phase: str = Phase.ALIGN,
        lm_targets: torch.Tensor | None = None,
        cls_labels: torch.Tensor | None = None,
        lambda_cls: float | None = None,
        inputs_embeds: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> ESSOutput:
        """[CLS] + text through the model with the attention rules of `phase` (the prefix all rows
        share, if any, in a pass of its own: `shared_prefix`).

        `lm_targets` [b, n] holds, at each position, the token to predict there (-100 where no LM
        loss applies); `cls_labels` [b] the class of each row. With either, the loss is
        `L_lm + λ·L_cls`, λ being `lambda_cls` or the phase's λ of the config. `inputs_embeds`
        [b, n, hidden] replaces the token lookup (the [CLS] row is still substituted by role).
        `segments` [b, n] marks a packed batch (`ChatEncoder.pack`): `cls_logits` and `cls_labels`
        then hold one entry per [CLS], in the order of the rows.
        """
        self.check_length(input_ids.shape[1])
        embeds = self.embed(input_ids, roles, inputs_embeds)
        if segments is not None:
            hidden = self._decode(embeds, roles, phase, 0, segments)
            cls_hidden = hidden[roles == Role.CLS]
        else:
            shared = self.shared_prefix(input_ids, roles, phase) if inputs_embeds is None else 0
            hidden = self._decode(embeds, roles, phase, shared)
            first_cls = (roles == Role.CLS).float().argmax(dim=1)
            cls_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), first_cls]
        out = ESSOutput(hidden_states=hidden, cls_logits=self.verdict_logits(cls_hidden))
        if lm_targets is None and cls_labels is None:
            return out

        zero = hidden.new_zeros((), dtype=torch.float32)
        if lm_targets is not None and (lm_targets != -100).any():
            where = lm_targets != -100
            logits = self.lm_logits(hidden[where]).float()
            out.lm_loss = F.cross_entropy(logits, lm_targets[where])
        else:
            # Keeps every LM parameter in the graph, so that DDP sees the same set on each process.
            out.lm_loss = zero + 0.0 * hidden.sum()
        out.cls_loss = F.cross_entropy(out.cls_logits.float(), cls_labels) if cls_labels is not None else zero
        if lambda_cls is None:
            lambda_cls = self.config.lambda_pretrain if phase == Phase.PRETRAIN else self.config.lambda_align
        out.loss = out.lm_loss + lambda_cls * out.cls_loss
        return out

    def shared_prefix(self, input_ids: torch.Tensor, roles: torch.Tensor, phase: str) -> int:
        """How many text tokens right after [CLS] every row of the batch shares, ids and roles alike,
        where none of them reads [CLS]. 0 where `share_prefix` is off, for one row, for rows without
        [CLS] in front, and in training with dropout or gradient checkpointing (every row must draw
        its own dropout mask; checkpointing drops the cache the rest reads the prefix from).

        Such tokens read only each other, so their keys, values and hidden states are the same in
        every row: `forward` computes them once. A chat template's system turn is such a prefix (24
        of the 86 tokens of an average alignment row of the default model)."""
        if not self.share_prefix or input_ids.shape[0] < 2 or not bool((roles[:, 0] == Role.CLS).all()):
            return 0
        if self.training and (self.has_dropout() or getattr(self.decoder, "gradient_checkpointing", False)):
            return 0
        text = roles[0, 1:] == Role.QUERY
        if phase == Phase.PRETRAIN:  # nobody reads [CLS] in the pretraining phase
            text |= roles[0, 1:] == Role.RESPONSE
        same = (input_ids[:, 1:] == input_ids[:1, 1:]).all(0) & (roles[:, 1:] == roles[:1, 1:]).all(0) & text
        return int(same.long().cumprod(0).sum())

    def has_dropout(self) -> bool:
        """Whether training draws dropout masks (attention or any dropout module)."""
        attention = getattr(self.base_lm.config, "attention_dropout", 0.0) or 0.0
        return attention > 0 or any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())

    def _decode(
        self, embeds: torch.Tensor, roles: torch.Tensor, phase: str, shared: int, segments: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Last hidden states [b, n, hidden] of the base decoder under the mask of `phase` (and of
        the `segments` of a packed batch); the `shared` tokens after [CLS] run once, as one row
        whose keys and values every row reads."""
        allowed = attention_allowed(roles, roles, phase, segments=segments)
        positions = position_ids(roles, segments=segments)
        if not shared:
            mask = additive_mask(allowed, embeds.dtype)
            return self.decoder(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state
        from transformers import DynamicCache

        b, n = roles.shape
        prefix = torch.arange(1, 1 + shared, device=roles.device)
        rest = torch.cat(
            [torch.zeros(1, dtype=torch.long, device=roles.device), torch.arange(1 + shared, n, device=roles.device)]
        )
        cache = DynamicCache()
        prefix_hidden = self.decoder(
            inputs_embeds=embeds[:1, prefix],
            attention_mask=additive_mask(allowed[:1, prefix][:, :, prefix], embeds.dtype),
            position_ids=positions[:1, prefix],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1)
        # The cache holds the prefix's keys first, then the rest's, in the order of `rest`.
        keys = torch.cat([prefix, rest])
        rest_hidden = self.decoder(
            inputs_embeds=embeds[:, rest],
            attention_mask=additive_mask(allowed[:, rest][:, :, keys], embeds.dtype),
            position_ids=positions[:, rest],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        return torch.cat([rest_hidden[:, :1], prefix_hidden.expand(b, -1, -1), rest_hidden[:, 1:]], dim=1)


class SequenceTooLong(ValueError):
    """A sequence the model cannot read as its base would (longer than its context or window)."""


def sliding_window(config) -> int | None:
    """The attention window of the base's sliding-window layers, None where no layer slides."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def find_checkpoint(reference: str | Path) -> Path | None:
    """The ESS checkpoint a `--model` value names: the folder itself or a run folder's `final/`."""
    for folder in (Path(reference), Path(reference) / "final"):
        if (folder / CONFIG_FILE).exists():
            return folder
    return None


def _add_lora(lm, config: ESSConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        bias="none",
    )
    with _peft_reads_a_deprecated_property():
        return get_peft_model(lm, lora)


@contextlib.contextmanager
def _peft_reads_a_deprecated_property():
    """peft (up to 0.21.2, the newest release) builds a `PeftModel` by reading the base model's
    `is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning on every run;
    the call is inside peft, so only that one warning is silenced, around the construction."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
