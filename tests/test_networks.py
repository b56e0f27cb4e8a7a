import pytest
import torch

from diffswarm.experts.config import ExpertConfig
from diffswarm.experts.expert import Expert
from diffswarm.experts.networks import NetConfig, build_network
from diffswarm.experts.objectives import expert_loss


def _inputs(b=3, size=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 1, size, size, generator=g), torch.rand(b, generator=g) * 999, torch.tensor([0, 2, 3])[:b]


def test_dit_conv_head_shape_and_adds_nothing_at_init():
    torch.manual_seed(0)
    cfg = NetConfig(kind="dit", size=8, width=16, depth=1, patch=2, heads=2, num_classes=3, head=4)
    net = build_network(cfg)
    x, ts, y = _inputs()
    out = net(x, ts, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # zero-initialised last conv: the output is exactly the DiT's own prediction channels
    direct = net.net(x, timestep=ts, class_labels=y).sample[:, :1]
    assert torch.equal(out, direct)
    # and the head is trainable: its last conv gets a gradient
    out.pow(2).mean().backward()
    assert net.head.conv2.weight.grad.abs().sum() > 0


def test_dit_without_head_is_unchanged():
    cfg = NetConfig(kind="dit", size=8, width=16, depth=1, patch=2, heads=2, num_classes=3)
    net = build_network(cfg)
    assert net.head is None and net.net.config.out_channels == 1


@pytest.mark.parametrize("opts", [dict(layers=2), dict(attn=True), dict(mid_attn=False),
                                  dict(depth=3, attn=True, size=16)])
def test_unet_options_shape_and_finite(opts):
    cfg = NetConfig(kind="unet", **{**dict(size=8, width=8, depth=2, num_classes=3), **opts})
    net = build_network(cfg)
    x, ts, y = _inputs(size=cfg.size)
    out = net(x, ts, y)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_old_net_config_dicts_load_with_todays_defaults():
    old = {"kind": "dit", "channels": 1, "size": 28, "num_classes": 10, "width": 96, "depth": 3, "patch": 4,
           "heads": 4, "extra": {}}
    cfg = NetConfig.from_dict({**old, "some_future_key": 1})
    assert cfg.head == 0 and cfg.layers == 1 and not cfg.attn and cfg.mid_attn
    ecfg = ExpertConfig.from_dict({"objective": "ddpm", "net": old})
    assert ecfg.loss_weighting == "none" and ecfg.ddpm_time == "uniform"  # how checkpoints before them trained
    # new experts: the recipe of docs/benchmarks.md (UNet 16x3 without middle attention, DDPM on FM's noise levels
    # with the flow weighting); an explicit size still wins
    new = NetConfig.for_kind("unet", size=28)
    assert (new.width, new.depth, new.mid_attn) == (16, 3, False) and NetConfig.for_kind("unet", width=32).width == 32
    assert NetConfig.for_kind("dit") == NetConfig()
    fresh = ExpertConfig(objective="ddpm")
    assert (fresh.ddpm_time, fresh.loss_weighting) == ("logit_normal", "flow")
    assert ExpertConfig.from_dict(fresh.to_dict()) == fresh


def test_min_snr_weighting_lowers_ddpm_loss_and_is_ddpm_only():
    net = NetConfig(kind="mlp", size=8, width=32, depth=1, num_classes=3)
    x0 = torch.rand(64, 1, 8, 8) * 2 - 1
    y = torch.randint(0, 3, (64,))
    torch.manual_seed(0)
    plain = Expert(ExpertConfig(objective="ddpm", net=net, loss_weighting="none"))
    weighted = Expert(ExpertConfig(objective="ddpm", net=net, loss_weighting="min_snr", min_snr_gamma=5.0))
    weighted.net.load_state_dict(plain.net.state_dict())
    lp, tp = expert_loss(plain, x0, y, torch.Generator().manual_seed(1))
    lw, tw = expert_loss(weighted, x0, y, torch.Generator().manual_seed(1))
    assert torch.equal(tp, tw) and torch.isfinite(lw).all()
    assert (lw <= lp + 1e-7).all() and (lw < lp).any()  # weight min(SNR, 5) / SNR <= 1
    with pytest.raises(ValueError):
        ExpertConfig(objective="fm", net=net, loss_weighting="min_snr")
    with pytest.raises(ValueError):
        ExpertConfig(objective="ddpm", net=net, loss_weighting="bogus")


def test_ddpm_logit_normal_steps_are_real_valued_and_finite():
    net = NetConfig(kind="mlp", size=8, width=32, depth=1, num_classes=3)
    e = Expert(ExpertConfig(objective="ddpm", net=net, ddpm_time="logit_normal"))
    x0 = torch.rand(256, 1, 8, 8) * 2 - 1
    loss, t = expert_loss(e, x0, torch.randint(0, 3, (256,)), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss).all() and ((t > 0) & (t < 1)).all()
    assert 0.35 < float(t.median()) < 0.65  # logit-normal flow times centre on t = 0.5
    with pytest.raises(ValueError):
        ExpertConfig(objective="ddpm", net=net, ddpm_time="bogus")


def test_flow_weighting_is_the_translated_velocity_loss():
    from diffswarm.experts.objectives import FLOW_WEIGHT_CAP

    net = NetConfig(kind="mlp", size=8, width=32, depth=1, num_classes=3)
    torch.manual_seed(0)
    plain = Expert(ExpertConfig(objective="ddpm", net=net, ddpm_time="logit_normal", loss_weighting="none"))
    flow = Expert(ExpertConfig(objective="ddpm", net=net, ddpm_time="logit_normal", loss_weighting="flow"))
    flow.net.load_state_dict(plain.net.state_dict())
    x0, y = torch.rand(64, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (64,))
    lp, t = expert_loss(plain, x0, y, torch.Generator().manual_seed(1))
    lf, _ = expert_loss(flow, x0, y, torch.Generator().manual_seed(1))
    w = (1 - t).pow(-2).clamp(max=FLOW_WEIGHT_CAP)
    assert torch.allclose(lf, lp * w, rtol=1e-5) and (lf >= lp).all()


def test_own_timestep_embeddings_match_diffusers_tensor_for_tensor():
    """diffswarm.experts.embeddings replaces diffusers' on the MLP and router path (no diffusers import for a
    client): same parameter names, same initialisation from the same seed, same outputs."""
    from diffusers.models.embeddings import TimestepEmbedding as DTE
    from diffusers.models.embeddings import Timesteps as DT

    from diffswarm.experts.embeddings import TimestepEmbedding, Timesteps

    t = torch.tensor([0.0, 1.5, 250.0, 999.0])
    for dim, flip, shift in ((128, True, 0), (127, False, 1)):
        assert torch.equal(Timesteps(dim, flip, shift)(t), DT(dim, flip, shift)(t))
    torch.manual_seed(3)
    ours = TimestepEmbedding(128, 64)
    torch.manual_seed(3)
    theirs = DTE(128, 64)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True))
    x = torch.randn(4, 128)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("opts", [dict(), dict(attn=True, mid_attn=True)])
def test_a_loaded_unet_answers_channels_last_with_the_same_answers_and_weights(tmp_path, opts):
    from diffswarm.experts.checkpoint import save_expert, tensors_sha256

    torch.manual_seed(0)
    cfg = ExpertConfig(objective="ddpm", net=NetConfig(kind="unet", size=8, width=8, depth=2, num_classes=3, **opts))
    trained = Expert(cfg)
    path = tmp_path / "expert.safetensors"
    save_expert(path, trained.net.state_dict(), cfg.to_dict(), {})
    loaded = Expert.from_checkpoint(path)
    weights = dict(loaded.net.named_parameters())
    convs = [w for n, w in weights.items() if w.dim() == 4]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not any(w.is_contiguous(memory_format=torch.channels_last) and w.shape[1] > 1 and w.shape[2] > 1
                   for w in trained.net.parameters() if w.dim() == 4)  # training keeps NCHW
    assert tensors_sha256(loaded.net.state_dict()) == loaded.weights_sha256  # the layout is not in the hash
    x, ts, y = _inputs()
    t = ts / 999
    want = trained.eval().velocity(x, t, y, 2.0)
    got = loaded.velocity(x, t, y, 2.0)
    assert got.is_contiguous() and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    save_expert(tmp_path / "again.safetensors", loaded.net.state_dict(), cfg.to_dict(), {})  # saves as loaded
    assert Expert.from_checkpoint(tmp_path / "again.safetensors").weights_sha256 == loaded.weights_sha256


def test_a_channels_last_unet_answers_nchw_for_any_input_layout():
    torch.manual_seed(0)
    net = build_network(NetConfig(kind="unet", size=8, width=8, depth=2, num_classes=3)).eval()
    net.inference_layout()
    x, ts, y = _inputs()
    with torch.no_grad():
        outs = [net(x, ts, y), net(x.contiguous(memory_format=torch.channels_last), ts, y)]
    assert all(o.is_contiguous() for o in outs)
    torch.testing.assert_close(outs[0], outs[1])
    net.inference_layout(channels_last=False)
    assert not net.channels_last and net.net.conv_in.weight.is_contiguous()
