import copy

import pytest
import torch
import torch.nn.functional as F

from forecast_peft.data.dataset import ForecastDataset
from forecast_peft.data.features import ACTOR_FEATURES
from forecast_peft.models.config import ModelConfig
from forecast_peft.models.encoder import history_features
from forecast_peft.models.forecaster import MAEFineTune, PromptForecaster, build_forecaster
from forecast_peft.models.layers import Block, NeighbourhoodAttention1D, neighbourhood_window, upsample_linear
from forecast_peft.models.mae import MAEModel, future_features
from forecast_peft.peft.freeze import configure_peft, count_parameters, trainable_line
from forecast_peft.peft.modules import Adapter, PromptTokens


def tiny() -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "embed_dim": 32,
            "encoder_depth": 2,
            "decoder_depth": 2,
            "num_heads": 2,
            "drop_path": 0.0,
            "agent": {"widths": [8, 16, 32], "heads": [1, 1, 2]},
            "lane": {"hidden": [16, 32], "out_hidden": 32},
            "peft": {"num_prompts": 4, "adapter_rank": 8},
        }
    )


@pytest.fixture(scope="module")
def batch(synth_root):
    return ForecastDataset(synth_root / "cache", "train").__getitems__(list(range(4)))


def test_published_parameter_counts():
    cfg = ModelConfig()
    peft = build_forecaster(cfg, "peft")
    configure_peft(peft)
    assert count_parameters(peft) == (383_577, 2_784_933)
    assert trainable_line(peft) == "trainable parameters: 383,577 of 2,784,933 (13.8%)"
    assert count_parameters(build_forecaster(cfg, "ft")) == (2_519_717, 2_519_717)
    assert count_parameters(build_forecaster(cfg, "baseline")) == (1_923_357, 1_923_357)


def test_freezing_follows_structure():
    model = build_forecaster(tiny(), "peft")
    configure_peft(model)
    for module in model.modules():
        if isinstance(module, (Adapter, PromptTokens)):
            assert all(p.requires_grad for p in module.parameters())
        if isinstance(module, Block):
            assert not module.attn.qkv.weight.requires_grad and module.attn.qkv.bias.requires_grad
            assert module.norm1.weight.requires_grad
    assert not model.encoder.hist_embed.tokenizer.weight.requires_grad
    assert all(p.requires_grad for p in model.traj_head.parameters())
    assert all(p.requires_grad for p in model.decoder.decoder_embed.parameters())
    assert not model.decoder.future_mask_token.requires_grad
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bns and not any(bn.weight.requires_grad for bn in bns)


def test_frozen_batchnorm_keeps_its_statistics(batch):
    model = build_forecaster(tiny(), "peft")
    configure_peft(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    model(batch)
    after = model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    trainable = build_forecaster(tiny(), "ft").train()
    stats = trainable.encoder.lane_embed.first[1].running_mean.clone()
    trainable(batch)
    assert not torch.equal(stats, trainable.encoder.lane_embed.first[1].running_mean)


def test_batched_modes_equal_sequential(batch):
    model = PromptForecaster(tiny(), adapters=True).eval()
    with torch.no_grad():
        ctx, attend, n = model.context(batch)
        prompts = model.mode_prompts.tokens
        y_all, pi_all = model.decode(ctx, attend, n, prompts)
        for k in range(prompts.shape[0]):
            y_k, pi_k = model.decode(ctx, attend, n, prompts[k : k + 1])
            torch.testing.assert_close(y_all[:, k], y_k[:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pi_all[:, k], pi_k[:, 0], rtol=1e-5, atol=1e-5)


def test_zero_initialised_adapters_change_nothing(batch):
    torch.manual_seed(0)
    plain = PromptForecaster(tiny(), adapters=False).eval()
    with_adapters = PromptForecaster(tiny(), adapters=True).eval()
    missing, unexpected = with_adapters.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".adapter_" in k for k in missing)
    with torch.no_grad():
        a, b = plain(batch), with_adapters(batch)
    torch.testing.assert_close(a["y_hat"], b["y_hat"])


def test_padding_actors_do_not_change_the_focal_output(batch):
    model = MAEFineTune(tiny()).eval()
    one = {k: (v[:1] if isinstance(v, torch.Tensor) else v[:1]) for k, v in batch.items()}
    n = int((~one["x_key_padding_mask"][0]).sum())
    trimmed = dict(one)
    for key in ACTOR_FEATURES + ("x_key_padding_mask",):
        trimmed[key] = one[key][:, :n]
    with torch.no_grad():
        torch.testing.assert_close(model(one)["y_hat"], model(trimmed)["y_hat"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("windowed", [False, True])
def test_neighbourhood_attention_matches_a_loop(windowed):
    torch.manual_seed(0)
    layer = NeighbourhoodAttention1D(8, 2, kernel=5)
    x = torch.randn(3, 13, 8)
    q, k, v = layer.qkv(x).view(3, 13, 3, 2, 4).permute(2, 0, 3, 1, 4)
    out = torch.zeros(3, 2, 13, 4)
    for i in range(13):
        start = min(max(i - 2, 0), 13 - 5)
        keys = range(start, start + 5)
        logits = torch.stack([(q[:, :, i] * k[:, :, j]).sum(-1) / 2.0 + layer.rpb[:, j - i + 4] for j in keys], -1)
        w = logits.softmax(-1)
        out[:, :, i] = sum(w[..., n, None] * v[:, :, j] for n, j in enumerate(keys))
    expected = layer.proj(out.transpose(1, 2).reshape(3, 13, 8))
    torch.testing.assert_close(layer(x, windowed), expected, rtol=1e-5, atol=1e-5)
    inside, _ = neighbourhood_window(13, 5)
    assert (inside.sum(-1) == 5).all()


@pytest.mark.parametrize("steps, kernel", [(50, 3), (13, 5), (3, 5), (1, 3)])
def test_windowed_neighbourhood_attention_equals_the_matrix_form(steps, kernel):
    """The form compiled networks run (each query with its window's keys, gathered) gives the
    eager form's outputs and gradients (float64), also for sequences shorter than the window;
    under torch.compile the layer takes it by itself."""
    from forecast_peft.models.compile import compile_forward

    torch.manual_seed(0)
    layer = NeighbourhoodAttention1D(16, 2, kernel).double()
    x = torch.randn(4, steps, 16, dtype=torch.float64, requires_grad=True)
    results = []
    for windowed in (False, True):
        out = layer(x, windowed)
        grads = torch.autograd.grad((out * torch.cos(out)).sum(), [x, layer.rpb, layer.qkv.weight])
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    seen = []
    matrix_form = NeighbourhoodAttention1D.forward

    def spy(self, x, windowed=None):
        seen.append(torch.compiler.is_compiling() if windowed is None else windowed)
        return matrix_form(self, x, windowed)

    torch.compiler.reset()
    layer.forward = spy.__get__(layer)
    traced = compile_forward(layer, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(traced, results[0][0], rtol=1e-10, atol=1e-12)
    assert seen == [True]


def test_agent_encoder_on_channels_last_taps_equals_the_convolution_form():
    """The form compiled networks run (every convolution a matrix product over its taps on
    channels-last tokens, ``forward_taps``) gives the eager form's outputs and gradients (float64),
    and under torch.compile the encoder takes it by itself."""
    from forecast_peft.models.compile import compile_forward
    from forecast_peft.models.layers import AgentEncoder

    torch.manual_seed(0)
    enc = AgentEncoder(4, [8, 16, 32], [1, 2, 1], [1, 2, 2], [3, 3, 5], 2.0, 0.0).double()
    x = torch.randn(5, 4, 50, dtype=torch.float64, requires_grad=True)
    results = []
    for taps in (False, True):
        out = enc(x, taps=taps)
        params = [x, enc.tokenizer.weight, enc.downsamples[0].reduction.weight, enc.laterals[0].weight, enc.fpn.bias]
        results.append((out, *torch.autograd.grad((out * torch.sin(out)).sum(), params)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    forms = []
    enc.forward_taps = lambda x: forms.append("taps") or AgentEncoder.forward_taps(enc, x)
    torch.compiler.reset()
    traced = compile_forward(enc, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(traced, results[0][0], rtol=1e-10, atol=1e-12)
    assert forms == ["taps"]


@pytest.mark.parametrize("t_in, t_out", [(13, 25), (25, 50), (7, 7)])
def test_gather_lerp_upsampling_matches_interpolate(t_in, t_out):
    x = torch.randn(4, 6, t_in)
    torch.testing.assert_close(
        upsample_linear(x, t_out), F.interpolate(x, size=t_out, mode="linear", align_corners=False)
    )


def test_mae_masking_is_complementary_and_vectorised(batch):
    model = MAEModel(tiny())
    mk = model.masks(batch)
    has_future = mk["has_future"]
    shown = mk["show_future"]
    assert not (shown & ~has_future).any()
    expected = (has_future.sum(-1) * 0.5).floor()
    assert torch.equal(shown.sum(-1).float(), expected)
    lanes = mk["lane_valid"].sum(-1)
    assert torch.equal(mk["lane_shown"].sum(-1).float(), (lanes * 0.5).floor().float())
    assert not (mk["lane_shown"] & ~mk["lane_valid"]).any()
    # every real actor is embedded once: from its future if it shows it, else from its history
    flat_valid, flat_shown = mk["actor_valid"].reshape(-1), shown.reshape(-1)
    assert flat_shown[mk["future_rows"]].all() and not flat_shown[mk["history_rows"]].any()
    rows = torch.cat([mk["history_rows"], mk["future_rows"]]).sort().values
    assert torch.equal(rows, batch["actor_index"])
    assert flat_valid.sum() > shown.sum() > 0
    # the encoder's real tokens: real actors, then the visible lanes kept in the first slots
    n, k = shown.shape[1], mk["keep_ids"].shape[1]
    layout = torch.zeros(shown.shape[0] * (n + k), dtype=torch.bool)
    layout[mk["encoder_index"]] = True
    layout = layout.view(-1, n + k)
    assert torch.equal(layout[:, :n], mk["actor_valid"]) and torch.equal(layout[:, n:], mk["kept_valid"])
    shown_lanes = torch.zeros_like(mk["lane_valid"]).scatter(1, mk["keep_ids"], layout[:, n:])
    assert torch.equal(shown_lanes, mk["lane_shown"])
    assert torch.equal(mk["visible_lane_rows"], mk["lane_shown"].reshape(-1).nonzero().squeeze(1))


def test_mae_embeds_each_actor_by_what_it_shows(batch):
    """Each agent encoder runs on its own actors only; the tokens equal embedding every actor
    both ways and choosing (the padding slots are zeros). Lanes likewise: only the visible ones."""
    torch.manual_seed(0)
    model = MAEModel(tiny()).eval()
    mk = model.masks(batch)
    b, n = mk["actor_valid"].shape
    hist = model.encoder.hist_embed(history_features(batch).transpose(-1, -2).reshape(b * n, 4, -1))
    fut = model.future_embed(future_features(batch).transpose(-1, -2).reshape(b * n, 3, -1))
    show = mk["show_future"][..., None]
    expected = torch.where(show, fut.view(b, n, -1), hist.view(b, n, -1)) * mk["actor_valid"][..., None]
    torch.testing.assert_close(model.actor_tokens(batch, mk), expected, rtol=1e-5, atol=1e-6)
    # and only the visible lanes are embedded; the encoder reads the same tokens in their slots
    enc = model.encoder
    pos_l = enc.positions(batch)[1]
    lanes = enc.embed_lanes(batch) + enc.lane_type_embed + pos_l
    expected = lanes.gather(1, mk["keep_ids"][..., None].expand(-1, -1, lanes.shape[-1]))
    kept = mk["kept_valid"]
    torch.testing.assert_close(model.visible_lane_tokens(batch, mk, pos_l)[kept], expected[kept], rtol=1e-5, atol=1e-6)
    # the work: in a training step each encoder sees exactly its own rows
    seen = {}
    for name, module in (("history", enc.hist_embed), ("future", model.future_embed), ("lanes", enc.lane_embed)):
        module.register_forward_hook(lambda mod, args, out, name=name: seen.update({name: args[0].shape[0]}))
    model.train()(dict(batch, mae_masks=mk))
    expected = {"history": "history_rows", "future": "future_rows", "lanes": "visible_lane_rows"}
    assert seen == {name: mk[key].shape[0] for name, key in expected.items()}
    assert seen["lanes"] < int(mk["lane_valid"].sum()) and seen["history"] < batch["actor_index"].shape[0]


def test_mae_losses_train(batch):
    torch.manual_seed(0)
    model = MAEModel(tiny())
    out = model(batch)
    assert set(out) == {"future", "history", "lane", "loss"}
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mode", ["peft", "ft", "baseline"])
def test_forecasters_output_shapes(batch, mode):
    out = build_forecaster(tiny(), mode)(batch)
    assert out["y_hat"].shape == (4, 6, 60, 2) and out["pi"].shape == (4, 6)


@pytest.mark.parametrize("mode", ["peft", "ft", "baseline"])
def test_heads_stay_float32_under_bf16_autocast(batch, mode):
    """Under autocast the heads would give bfloat16: a predicted endpoint 64-128 m away on a
    0.5 m grid. They run in their weights' float32, so only the features carry bf16's error."""
    torch.manual_seed(0)
    model = build_forecaster(tiny(), mode).eval()
    head = model.loc[-1] if mode == "baseline" else model.traj_head
    with torch.no_grad():
        head.bias.fill_(100.3)  # every coordinate about 100 m out, where bfloat16's values are 0.5 m apart
        reference = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch)
    assert out["y_hat"].dtype == out["pi"].dtype == torch.float32
    # bfloat16 outputs would round 100.3 to 100.5: 0.2 m off at every coordinate
    assert (out["y_hat"] - reference["y_hat"]).abs().max() < 0.05
    assert (out["y_hat"] - reference["y_hat"]).abs().max() > 0  # bf16 did run in the network


def test_mae_heads_stay_float32_under_bf16_autocast(batch):
    torch.manual_seed(0)
    model = MAEModel(tiny())
    dtypes = []
    for head in (model.history_pred, model.future_pred, model.lane_pred):
        head.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert dtypes == [torch.float32] * 3 and losses["loss"].dtype == torch.float32


def test_decoder_query_restriction_matches_full_output():
    from forecast_peft.models.mae import MAEDecoder

    torch.manual_seed(0)
    dec = MAEDecoder(tiny()).eval()
    tokens = torch.randn(3, 11, 32)
    attend = torch.ones(3, 11, dtype=torch.bool)
    attend[1, 7:] = False
    with torch.no_grad():
        full = dec(tokens, attend)
        part = dec(tokens, attend, (0, 4))
    torch.testing.assert_close(part, full[:, [0, 4]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_lane_pointnet_equals_the_concatenated_form(train):
    """The split second layer computes the published PointNet: second(cat[max-pooled h, h])."""
    from forecast_peft.models.layers import LanePointNet

    torch.manual_seed(0)
    net = LanePointNet(3, [16, 32], 24, 8).train(train)
    x = torch.randn(5, 20, 3, dtype=torch.float64, requires_grad=True)
    net = net.double()
    ref_net = copy.deepcopy(net)
    h = ref_net.first(x)
    g = h.max(dim=1, keepdim=True).values.expand_as(h)
    ref = ref_net.second(torch.cat([g, h], dim=-1)).max(dim=1).values
    out = net(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    (grad_out,) = torch.autograd.grad(out.square().sum(), x)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(grad_out, grad_ref, rtol=1e-10, atol=1e-10)
    if train:  # the batch statistics are the same too
        torch.testing.assert_close(net.second[1].running_mean, ref_net.second[1].running_mean)


@pytest.mark.parametrize("steps", [50, 60, 7])
def test_agent_encoder_equals_the_full_resolution_fpn(steps):
    """Computing the finest FPN level at the last steps only gives the full FPN's last step."""
    from forecast_peft.models.layers import AgentEncoder, upsample_linear

    torch.manual_seed(0)
    enc = AgentEncoder(4, [8, 16, 32], [1, 1, 1], [1, 2, 2], [3, 3, 5], 2.0, 0.0).double().eval()
    for p in enc.parameters():  # non-zero everywhere, biases included
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(6, 4, steps, dtype=torch.float64, requires_grad=True)

    def full(x):
        h = enc.tokenizer(x).transpose(1, 2)
        feats = []
        for i, level in enumerate(enc.levels):
            for layer in level:
                h = layer(h)
            feats.append(enc.out_norms[i](h).transpose(1, 2))
            if i < len(enc.downsamples):
                h = enc.downsamples[i](h)
        lat = [conv(f) for conv, f in zip(enc.laterals, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + upsample_linear(lat[i], lat[i - 1].shape[-1])
        return enc.fpn(lat[0])[..., -1]

    out, ref = enc(x), full(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    (g_out,) = torch.autograd.grad(out.sin().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sin().sum(), x)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-10, atol=1e-10)


def _double_block_stack(depth: int) -> torch.nn.ModuleList:
    """Transformer blocks with adapters, every parameter non-zero (the adapters' zero-initialised
    up-projections included), in float64."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(Block(16, 4) for _ in range(depth))
    for block in blocks:
        block.adapter_attn, block.adapter_mlp = Adapter(16, 4), Adapter(16, 4)
    for p in blocks.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return blocks.double().eval()


def test_prompts_as_memory_equal_inserted_prompts():
    """A layer's context prompts as keys/values only (``memory``) equal the published form: the
    prompts inserted between actor and lane tokens, run through the block, then dropped."""
    (block,) = _double_block_stack(1)
    n, p = 5, 3
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    prompts = torch.randn(p, 16, dtype=torch.float64, requires_grad=True)
    attend = torch.ones(2, 12, dtype=torch.bool)
    attend[1, 3:5] = False  # padded actors
    attend[1, 10:] = False  # padded lanes

    inserted = torch.cat([x[:, :n], prompts.expand(2, -1, -1), x[:, n:]], dim=1)
    attend_inserted = torch.cat([attend[:, :n], attend.new_ones(2, p), attend[:, n:]], dim=1)
    out_ref = block(inserted, attend_inserted)
    ref = torch.cat([out_ref[:, :n], out_ref[:, n + p :]], dim=1)
    out = block(x, attend, memory=prompts)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, prompts, *block.parameters()])
    grads_ref = torch.autograd.grad((ref * weights).sum(), [x, prompts, *block.parameters()])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("queries", [None, (0, 4)])
def test_decoder_pairs_equal_materialised_pairs(depth, queries):
    """The decoder over (mode prompts, scene context) pairs equals the decoder on the
    materialised [B * K, P + L, D] sequences, outputs and gradients."""
    from forecast_peft.models.mae import MAEDecoder

    cfg = tiny()
    cfg.embed_dim, cfg.num_heads, cfg.decoder_depth = 16, 4, depth
    dec = MAEDecoder(cfg)
    dec.blocks = _double_block_stack(depth)
    dec = dec.double().eval()
    b, k, p, length = 3, 2, 2, 7
    prefix = torch.randn(k, p, 16, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(b, length, 16, dtype=torch.float64, requires_grad=True)
    attend = torch.ones(b, 1, p + length, dtype=torch.bool)
    attend[1, :, 6:] = False
    attend = attend.expand(-1, k, -1).reshape(b * k, p + length)
    tokens = torch.cat([prefix[None].expand(b, -1, -1, -1), ctx[:, None].expand(-1, k, -1, -1)], dim=2)
    ref = dec(tokens.reshape(b * k, p + length, 16), attend, queries)
    out = dec.forward_pairs(prefix, ctx, attend, queries)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(out)
    params = [prefix, ctx, *dec.parameters()]
    grads = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
    grads_ref = torch.autograd.grad((ref * weights).sum(), params, allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        assert (g is None) == (g_ref is None)
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def _double_batch(batch: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("mode", ["peft", "ft", "baseline"])
def test_packed_tokens_equal_padded_tokens(batch, mode):
    """Skipping the padding slots in the transformer blocks' per-token work (the batch's real
    actor and lane indices) changes no output that is read, and no gradient."""
    b, n = batch["x_key_padding_mask"].shape
    m = batch["lane_key_padding_mask"].shape[1]
    assert len(batch["actor_index"]) < b * n and len(batch["lane_index"]) < b * m  # there is padding
    torch.manual_seed(0)
    model = build_forecaster(tiny(), mode).double().eval()
    for p in model.parameters():  # adapters and prompts away from their zero initialisation
        torch.nn.init.normal_(p, std=0.2)
    packed = _double_batch(batch)
    padded = {k: v for k, v in packed.items() if k not in ("actor_index", "lane_index")}
    outs = [model(x) for x in (packed, padded)]
    real_others = ~batch["x_key_padding_mask"][:, 1:]
    read = {"y_hat": lambda t: t, "pi": lambda t: t, "y_hat_others": lambda t: t[real_others]}
    weights = {k: torch.randn_like(read[k](outs[0][k])) for k in outs[0]}
    grads = []
    for out in outs:
        loss = sum((read[k](out[k]) * weights[k]).sum() for k in out)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for key in outs[0]:
        torch.testing.assert_close(read[key](outs[0][key]), read[key](outs[1][key]), rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "rounding, kernel", [({"static": True}, "auto"), ({"slot_multiple": 8}, "auto"), ({"slot_multiple": 8}, "varlen")]
)
@pytest.mark.parametrize("mode", ["peft", "ft", "baseline"])
def test_static_batches_give_the_forecasts_of_packed_ones(synth_root, mode, rounding, kernel):
    """The fixed-shape batches of CUDA graphs (``collate_scenes(static=True)``: more padding
    slots, the blocks on the padded layout) and batches whose slots are rounded up
    (``data.slot_multiple``: more padding slots, the blocks on the real tokens; attention on the
    padded layout, or on the packed tokens when held to ``varlen``) give the forecasts of
    ordinary batches."""
    from forecast_peft.data.dataset import collate_scenes
    from forecast_peft.models.layers import set_attention_kernel

    data = ForecastDataset(synth_root / "cache", "val")
    scenes = [data[i] for i in range(5)]
    torch.manual_seed(0)
    model = build_forecaster(tiny(), mode).double().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        packed = model(_double_batch(collate_scenes(scenes)))
        set_attention_kernel(model, kernel)
        static = model(_double_batch(collate_scenes(scenes, **rounding)))
    for key in ("y_hat", "pi"):
        torch.testing.assert_close(static[key], packed[key], rtol=1e-10, atol=1e-10)


def test_token_packing_lists_the_real_tokens(batch, monkeypatch):
    """token_packing's indices are exactly the slots of real actors and lanes in the layout."""
    from forecast_peft.models.encoder import token_packing

    b, n = batch["x_key_padding_mask"].shape
    m = batch["lane_key_padding_mask"].shape[1]
    actor, lane = ~batch["x_key_padding_mask"], ~batch["lane_key_padding_mask"]
    k, p = 3, 2
    packing = token_packing(batch, "aal", rows_per_scene=k, prefix=p)
    assert (packing.rows, packing.length) == (b * k, p + 2 * n + m)
    row = torch.cat([torch.ones(b, p, dtype=torch.bool), actor, actor, lane], dim=1)  # [B, length]
    expected = row[:, None].expand(-1, k, -1).reshape(-1).nonzero().squeeze(-1)
    assert sorted(packing.index.tolist()) == expected.tolist()
    encoder = token_packing(batch, "al")
    assert sorted(encoder.index.tolist()) == torch.cat([actor, lane], 1).reshape(-1).nonzero().squeeze(-1).tolist()
    x = torch.randn(b * (n + m), 5)
    torch.testing.assert_close(encoder.pack(encoder.unpack(x[: len(encoder.index)])), x[: len(encoder.index)])
    assert token_packing({k: v for k, v in batch.items() if k != "lane_index"}, "al") is None
    monkeypatch.setattr("forecast_peft.models.encoder.PACK_TOKENS", False)  # the padded form, for benchmarks
    assert token_packing(batch, "al") is None


def test_drop_path_on_packed_tokens_drops_whole_rows():
    from forecast_peft.models.layers import DropPath, Packing

    torch.manual_seed(0)
    index = torch.tensor([0, 1, 2, 5, 6, 10, 12, 13, 14, 15])  # rows of 4 slots, some padded
    packing = Packing(index, rows=4, length=4)
    drop = DropPath(0.5).train()
    seen = set()
    for _ in range(20):
        out = drop(torch.ones(len(index), 3), packing)
        per_row = {}
        for slot, value in zip(index.tolist(), out[:, 0].tolist()):
            per_row.setdefault(slot // 4, set()).add(value)
        assert all(len(v) == 1 for v in per_row.values())  # one draw per row, not per token
        seen |= {v.pop() for v in per_row.values()}
    assert seen == {0.0, 2.0}


def test_selecting_packed_tokens_equals_unpacking_them():
    """Packing.select gives take_tokens(unpack(x)): the real tokens' values, zeros at padding
    slots (slot 3 of row 0 and slot 1 of row 3 here), and the same gradients."""
    from forecast_peft.models.layers import Packing, take_tokens

    index = torch.tensor([0, 1, 2, 5, 6, 10, 12, 14, 15])  # rows of 4 slots, some padded
    packing = Packing(index, rows=4, length=4)
    x = torch.randn(len(index), 3, dtype=torch.float64, requires_grad=True)
    positions = (0, 3, 1)
    (picked,) = packing.select(positions, x)
    expected = take_tokens(packing.unpack(x), positions)
    assert picked.shape == (4, 3, 3)
    assert torch.equal(picked, expected)
    assert torch.equal(picked[0, 1], torch.zeros(3, dtype=torch.float64))  # slot 3: padding
    assert torch.equal(picked[3, 2], torch.zeros(3, dtype=torch.float64))  # slot 13: padding
    weights = torch.randn(4, 3, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad((picked * weights).sum(), x)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), x)
    assert torch.equal(grad, grad_expected)


@pytest.mark.parametrize("prompts", [False, True])
def test_packed_mae_blocks_equal_padded(batch, prompts):
    """MAE pre-training (and target-parameter pre-training, with mode prompts in front) gives the
    same losses and gradients whether its encoder and decoder blocks skip the padding slots (of
    the actors, the visible lanes and all lanes) or not."""
    torch.manual_seed(0)
    cfg = tiny()
    model = MAEModel(cfg).double().eval()
    if prompts:
        model.mode_prompts = PromptTokens(cfg.num_modes, cfg.peft.num_prompts, cfg.embed_dim).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    packed = _double_batch(batch)
    padded = {k: v for k, v in packed.items() if k not in ("actor_index", "lane_index")}
    results = []
    for x in (packed, padded):
        torch.manual_seed(1)  # the same masks and mode picks
        out = model(x)
        results.append((out, torch.autograd.grad(out["loss"], list(model.parameters()))))
    (out, grads), (out_ref, grads_ref) = results
    for key in ("future", "history", "lane", "loss"):
        torch.testing.assert_close(out[key], out_ref[key], rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["peft", "ft"])
def test_training_objective_on_the_same_winners_agrees_across_precisions(mode):
    """What tests/test_gpu.py's CPU-against-CUDA check relies on: an untrained forecaster's modes
    lie within about 1e-6 of each other, so rounding picks the winner the loss trains (a float64
    copy chose another mode than float32 in one of six scenes, its gradients 50% apart); scored on
    one set of winners, float32 and float64 give the same loss and gradients."""
    from forecast_peft.lit.losses import best_modes
    from tests.test_host_sync import forward_backward, host_batch, make_module

    torch.manual_seed(0)
    m32 = make_module(mode).train()
    m64 = copy.deepcopy(m32).double()
    batch = host_batch(mode)
    b64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    with torch.no_grad():  # the near tie that makes the shared winners necessary
        gaps = [m(b)["y_hat"] - b["y"][:, None, 0] for m, b in ((m32, batch), (m64, b64))]
    l2 = torch.linalg.vector_norm(gaps[1], dim=-1).sum(-1).sort(-1).values
    assert float(((l2[:, 1] - l2[:, 0]) / l2[:, 0]).min()) < 1e-5
    winners: list = []
    loss32, loss64 = forward_backward(m32, batch, winners), forward_backward(m64, b64, winners)
    assert len(winners) == 1 and torch.equal(winners[0], best_modes(m32.model(batch), batch))
    assert abs(loss32.item() - loss64.item()) <= 1e-6 * loss64.item()
    # a gradient near zero (the score head's bias: the mode scores' softmax barely moves with it,
    # 5e-8) is float32's rounding of sums of terms of order one, a few of its 1.2e-7 steps
    for (name, p), q in zip(m32.model.named_parameters(), m64.model.parameters(), strict=True):
        if p.grad is not None:
            assert float((p.grad.double() - q.grad).norm()) <= 1e-3 * float(q.grad.norm()) + 1e-6, name


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # on purpose: the values
@pytest.mark.parametrize("kernel", ["math", "flex", "varlen"])
def test_an_attention_kernel_held_to_gives_the_same_forecasts(batch, kernel):
    """``set_attention_kernel`` holds every transformer attention to one kernel (a run's setting
    for the GPU): the same forecasts, also traced whole by Dynamo (no graph break); a kernel the
    device lacks fails at the first pass, and an unknown name at once. Traced for this batch's
    shapes alone (2.5x less time than dynamic shapes): tests/test_dynamic_shapes.py traces the
    network with dynamic shapes, as ``compile=true`` runs it, on the default kernel (math is its
    call in a backend's context) and varlen, and on flex in ``make test-slow``."""
    from forecast_peft.errors import ConfigError
    from forecast_peft.models.layers import SelfAttention, set_attention_kernel

    torch.manual_seed(0)
    model = PromptForecaster(tiny(), adapters=True).eval()
    with torch.no_grad():
        want = model(batch)
        set_attention_kernel(model, kernel)
        attentions = [m for m in model.modules() if isinstance(m, SelfAttention)]
        assert len(attentions) == 4 and all(m.kernel == kernel for m in attentions)
        got = model(batch)
        torch.testing.assert_close(got["y_hat"], want["y_hat"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["pi"], want["pi"], rtol=1e-5, atol=1e-5)
        torch.compiler.reset()
        traced = torch.compile(model.forward, fullgraph=True, backend="eager", dynamic=False)(batch)
        torch.testing.assert_close(traced["y_hat"], want["y_hat"], rtol=1e-5, atol=1e-5)
        if not torch.cuda.is_available():  # no cuDNN attention on a CPU
            set_attention_kernel(model, "cudnn")
            with pytest.raises(RuntimeError, match="No viable backend"):
                model(batch)
    with pytest.raises(ConfigError, match="attention_kernel must be one of"):
        set_attention_kernel(model, "flash")


@pytest.mark.parametrize("mode", ["peft", "peft_folded", "ft", "mae"])
def test_varlen_attention_on_packed_tokens_equals_the_padded_form(batch, mode, monkeypatch):
    """Held to ``varlen``, the blocks that skip padding run attention on their packed real tokens
    (rows delimited by ``Packing.starts``; on the CPU a dense stand-in for FlashAttention's
    variable-length kernel): the encoder's blocks with the context prompts' keys and values after
    each row's own, the decoder's pairs, its later blocks, its last block's two queries per row,
    the MAE's encoder and decoder; float64 outputs and gradients equal the padded form's at 1e-10."""
    from forecast_peft.models.layers import set_attention_kernel
    from forecast_peft.models.mae import MAE_MASKS, MAEModel, sample_masks
    from forecast_peft.peft.fold import fold_adapters

    torch.manual_seed(0)
    if mode == "mae":
        model = MAEModel(tiny()).double().eval()
        data = dict(batch)
        data[MAE_MASKS] = sample_masks(data, model.cfg.mae)
    else:
        model = PromptForecaster(tiny(), adapters=mode != "ft").double().eval()
        if mode == "peft_folded":
            model = fold_adapters(model)
        data = batch
    data = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in data.items()}
    from forecast_peft.models import layers

    calls = []
    dense = layers.varlen_attention
    monkeypatch.setattr(layers, "varlen_attention", lambda *args: calls.append(args[0].shape) or dense(*args))
    key = "loss" if mode == "mae" else "y_hat"
    results = []
    for kernel in ("auto", "varlen"):
        set_attention_kernel(model, kernel)
        out = model(data)[key]
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.sum(), params, allow_unused=True) if params else []
        results.append((out, [g for g in grads if g is not None]))
    # every block: the encoder's (with the context prompts' keys after each row's) and the decoder's
    assert len(calls) == 4
    assert any(shape[0] == 2 * 4 * 6 for shape in calls) != (mode == "mae")  # the last block's 2 queries
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
