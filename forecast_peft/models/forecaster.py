"""Forecasting models: Forecast-PEFT / Forecast-FT (prompts on the re-used MAE decoder) and the
Forecast-MAE fine-tuning baseline (MLP multimodal head + dense head)."""

from __future__ import annotations

import torch
from torch import nn

from forecast_peft.constants import FUTURE_STEPS
from forecast_peft.models.config import ModelConfig
from forecast_peft.models.encoder import SceneEncoder, token_packing
from forecast_peft.models.layers import head_output
from forecast_peft.models.mae import MAEDecoder
from forecast_peft.peft.modules import PromptTokens, inject_adapters

TUNE_MODES = ("peft", "ft", "baseline")


class PromptForecaster(nn.Module):
    """Scene encoder with Contextual Embedding Prompts, then the MAE decoder once per mode with
    that mode's Modality Control Prompts in front of the actor history tokens, future mask
    tokens and lane tokens. The focal agent's future token gives the mode's trajectory, the
    mode's first prompt token its score. ``adapters`` adds the parallel adapters (PEFT)."""

    def __init__(self, cfg: ModelConfig, adapters: bool):
        super().__init__()
        d, p = cfg.embed_dim, cfg.peft.num_prompts
        self.cfg = cfg
        self.encoder = SceneEncoder(cfg)
        self.decoder = MAEDecoder(cfg)
        self.encoder.context_prompts = PromptTokens(cfg.encoder_depth, p, d)
        self.mode_prompts = PromptTokens(cfg.num_modes, p, d)
        self.traj_head = nn.Linear(d, FUTURE_STEPS * 2)
        self.score_head = nn.Linear(d, 1)
        # for inference, ``peft.fold`` puts the mode prompts' first-block in-projection here
        self.register_buffer("mode_qkv", None, persistent=False)
        if adapters:
            inject_adapters(self, cfg.peft.adapter_rank)

    def heads(self) -> list[nn.Module]:
        """Task-specific modules trained in every mode: decoder input projection and the heads."""
        return [self.decoder.decoder_embed, self.traj_head, self.score_head]

    def context(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Decoder input shared by all modes: ([B, 2N + M, D] tokens, [B, 2N + M] attend, N)."""
        actors, lanes = self.encoder(batch)
        dec = self.decoder
        pos_a, pos_l = dec.positions(batch)
        hist = dec.decoder_embed(actors) + pos_a
        fut = dec.future_mask_token.to(hist.dtype) + pos_a
        lane = dec.decoder_embed(lanes) + pos_l
        valid = ~batch["x_key_padding_mask"]
        attend = torch.cat([valid, valid, ~batch["lane_key_padding_mask"]], dim=1)
        return torch.cat([hist, fut, lane], dim=1), attend, actors.shape[1]

    def decode(
        self, ctx: torch.Tensor, attend: torch.Tensor, num_actors: int, prompts: torch.Tensor, batch: dict | None = None
    ):
        """All K modes in one decoder call. prompts [K, P, D] -> y_hat [B, K, 60, 2], pi [B, K].
        With ``batch`` (its real actor and lane indices), the decoder's per-token work skips the
        padding slots."""
        b, length, d = ctx.shape
        k, p, _ = prompts.shape
        attend = torch.cat([attend.new_ones(b, p), attend], dim=1)[:, None].expand(-1, k, -1)
        # only two outputs per mode are read: the first prompt token and the focal future token
        queries = (0, p + num_actors)
        packing = None if batch is None else token_packing(batch, "aal", rows_per_scene=k, prefix=p)
        out = self.decoder.forward_pairs(
            prompts, ctx, attend.reshape(b * k, p + length), queries, packing, self.mode_qkv
        )
        out = out.view(b, k, 2, d)
        y_hat = head_output(self.traj_head, out[:, :, 1]).view(b, k, FUTURE_STEPS, 2)
        pi = head_output(self.score_head, out[:, :, 0]).squeeze(-1)
        return y_hat, pi

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        ctx, attend, n = self.context(batch)
        y_hat, pi = self.decode(ctx, attend, n, self.mode_prompts.tokens, batch)
        return {"y_hat": y_hat, "pi": pi}


class MAEFineTune(nn.Module):
    """Forecast-MAE fine-tuning: the encoder, an MLP multimodal head on the focal token and a
    dense head regressing every other agent's future."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, k = cfg.embed_dim, cfg.num_modes
        self.cfg = cfg
        self.encoder = SceneEncoder(cfg)
        self.multimodal_proj = nn.Linear(d, k * d)
        self.loc = nn.Sequential(
            nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, d), nn.ReLU(), nn.Linear(d, FUTURE_STEPS * 2)
        )
        self.pi = nn.Sequential(nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, d), nn.ReLU(), nn.Linear(d, 1))
        self.dense_predictor = nn.Sequential(nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, FUTURE_STEPS * 2))

    def heads(self) -> list[nn.Module]:
        return [self.multimodal_proj, self.loc, self.pi, self.dense_predictor]

    # the other agents' futures (the dense head) are a training target: a network that only
    # forecasts the focal agent (`fpeft deploy`'s) leaves them out
    dense_others = True

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        actors, _ = self.encoder(batch)
        b, n, d = actors.shape
        modes = self.multimodal_proj(actors[:, 0]).view(b, self.cfg.num_modes, d)
        out = {
            "y_hat": head_output(self.loc, modes).view(b, self.cfg.num_modes, FUTURE_STEPS, 2),
            "pi": head_output(self.pi, modes).squeeze(-1),
        }
        if self.dense_others:
            out["y_hat_others"] = head_output(self.dense_predictor, actors[:, 1:]).view(b, n - 1, FUTURE_STEPS, 2)
        return out


def build_forecaster(cfg: ModelConfig, mode: str) -> nn.Module:
    if mode == "peft":
        return PromptForecaster(cfg, adapters=True)
    if mode == "ft":
        return PromptForecaster(cfg, adapters=False)
    if mode == "baseline":
        return MAEFineTune(cfg)
    from forecast_peft.errors import UserError

    raise UserError(f"unknown --mode '{mode}': choose one of {', '.join(TUNE_MODES)}")
