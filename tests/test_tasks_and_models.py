"""Task samplers and networks: shapes, distributions, reproducibility."""

import math

import torch

import gbml


def test_sinusoid_tasks_follow_the_maml_distribution():
    sampler = gbml.SinusoidTasks()
    generator = torch.Generator().manual_seed(0)
    amplitude, phase = sampler.sample_parameters(4000, generator)
    assert float(amplitude.min()) >= 0.1 and float(amplitude.max()) <= 5.0
    assert float(phase.min()) >= 0.0 and float(phase.max()) <= math.pi
    assert abs(float(amplitude.mean()) - 2.55) < 0.1
    tasks = sampler.make_tasks((amplitude[:3], phase[:3]), 5, 7, generator, dtype=torch.float64)
    assert tasks.x_support.shape == (3, 5, 1) and tasks.y_query.shape == (3, 7, 1)
    assert float(tasks.x_support.abs().max()) <= 5.0
    for t in range(3):
        expected = amplitude[t] * torch.sin(tasks.x_query[t] - phase[t])
        assert torch.allclose(tasks.y_query[t], expected, atol=1e-14)


def test_sampling_is_reproducible_and_device_independent():
    a = gbml.SinusoidTasks().sample(3, 5, 5, torch.Generator().manual_seed(7))
    b = gbml.SinusoidTasks().sample(3, 5, 5, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a.x_support.dtype == torch.float32


def test_noise_free_linear_tasks_are_exactly_linear():
    sampler = gbml.LinearRegressionTasks(dim=3, noise_std=0.0)
    generator = torch.Generator().manual_seed(1)
    (weights,) = sampler.sample_parameters(2, generator)
    tasks = sampler.make_tasks((weights,), 4, 6, generator, dtype=torch.float64)
    for t in range(2):
        x_all, y_all = tasks.task(t).joined()
        assert torch.allclose(x_all @ weights[t].unsqueeze(-1), y_all, atol=1e-14)
    assert tasks.x_query.shape == (2, 6, 3) and tasks.y_support.shape == (2, 4, 1)


def test_joined_concatenates_along_the_sample_axis():
    tasks = gbml.SinusoidTasks().sample(4, 5, 3, torch.Generator().manual_seed(0))
    x_all, y_all = tasks.joined(batched=True)
    assert x_all.shape == (4, 8, 1) and y_all.shape == (4, 8, 1)
    x_one, _ = tasks.task(2).joined()
    assert x_one.shape == (8, 1)
    assert torch.equal(x_all[2], x_one)
    assert torch.equal(x_one[:5], tasks.x_support[2]) and torch.equal(x_one[5:], tasks.x_query[2])


def test_stack_tasks_builds_a_batch():
    tasks = gbml.SinusoidTasks().sample(3, 2, 2, torch.Generator().manual_seed(0))
    batch = gbml.stack_tasks([tasks.task(t) for t in range(3)])
    assert all(torch.equal(x, y) for x, y in zip(batch, tasks))


def test_conv_net_is_the_maml_architecture():
    model = gbml.ConvNet(ways=5)
    counts = {name: p.numel() for name, p in model.named_parameters()}
    convs = [n for n in counts if n.endswith("weight") and counts[n] % 9 == 0 and "features" in n]
    assert len(convs) == 4
    # 3×3 convolutions with 64 filters: 1·64·9+64, then 3 × (64·64·9+64); batch norm 4 × 128;
    # the head 64·5+5 (four poolings take 28×28 down to 1×1).
    assert sum(counts.values()) == (64 * 9 + 64) + 3 * (64 * 64 * 9 + 64) + 4 * 128 + (64 * 5 + 5)
    assert model(torch.zeros(7, 1, 28, 28)).shape == (7, 5)


def test_sinusoid_mlp_is_1_40_40_1():
    model = gbml.SinusoidMLP()
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    assert model(torch.zeros(3, 1)).shape == (3, 1)


def test_finn_omniglot_net_is_the_reference_architecture():
    """Finn et al.'s Omniglot net: stride-2 convolutions, batch norm with β only, a spatial mean,
    a 64 → N head; Xavier-uniform convolutions, zero biases, N(0, 1) head weights."""
    torch.manual_seed(0)
    model = gbml.finn_omniglot_net(ways=5)
    counts = {name: p.numel() for name, p in model.named_parameters()}
    # convolutions 1·64·9+64 and 3 × (64·64·9+64); batch norm shifts 4 × 64; head 64·5+5.
    assert sum(counts.values()) == (64 * 9 + 64) + 3 * (64 * 64 * 9 + 64) + 4 * 64 + (64 * 5 + 5)
    sides = []
    x = torch.rand(7, 1, 28, 28)
    for module in model.features:
        x = module(x)
        if isinstance(module, torch.nn.Conv2d):
            sides.append(x.shape[-1])
    assert sides == [14, 7, 4, 2]
    assert model(torch.rand(7, 1, 28, 28)).shape == (7, 5)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    weights = [conv.weight.detach() for conv in convs]
    for conv, weight in zip(convs, weights):
        fan_in, fan_out = conv.weight[0].numel(), conv.weight.shape[0] * 9
        bound = math.sqrt(6 / (fan_in + fan_out))  # Glorot-uniform
        assert float(weight.abs().max()) <= bound
        assert abs(float(weight.std()) - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
        assert float(conv.bias.detach().abs().max()) == 0.0
    assert abs(float(model.head.weight.detach().std()) - 1.0) < 0.25
    norms = [m for m in model.features if isinstance(m, gbml.CompositeBatchNorm2d)]
    assert len(norms) == 4 and all(m.weight is None and m.eps == 1e-3 for m in norms)


def test_rajeswaran_omniglot_net_computes_what_their_network_computes():
    """Rajeswaran et al.'s network written as their code builds it (torch.nn batch norm without
    running statistics, the one-sided zero padding before the third convolution, a flattening
    head), given our network's weights, gives the same logits in float64; and the
    initialisation is theirs: Xavier-uniform with gain 1.73, biases on [0, 0.05]."""
    from torch import nn

    torch.manual_seed(0)
    model = gbml.rajeswaran_omniglot_net(ways=5).double()
    layers = []
    for block in range(4):
        if block == 2:
            layers.append(nn.ZeroPad2d((0, 1, 0, 1)))
        layers += [
            nn.Conv2d(1 if block == 0 else 64, 64, 3, stride=2, padding=1),
            nn.BatchNorm2d(64, track_running_stats=False),
            nn.ReLU(),
        ]
    reference = nn.Sequential(*layers, nn.Flatten(), nn.Linear(2 * 2 * 64, 5)).double()
    kinds = (nn.Conv2d, nn.Linear, gbml.CompositeBatchNorm2d)
    ours = [m for m in [*model.features, model.head] if isinstance(m, kinds)]
    theirs = [m for m in reference if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    assert len(ours) == len(theirs) == 9
    with torch.no_grad():
        for mine, other in zip(ours, theirs):
            other.weight.copy_(mine.weight)
            other.bias.copy_(mine.bias)
            mine.bias.add_(0.01 * torch.randn_like(mine.bias))  # batch norm's β too (it starts at 0)
            other.bias.copy_(mine.bias)
    x = torch.rand(7, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(model(x), reference(x), rtol=0, atol=1e-12)

    torch.manual_seed(0)
    fresh = gbml.rajeswaran_omniglot_net(ways=5)
    for layer in [m for m in [*fresh.features, fresh.head] if isinstance(m, (nn.Conv2d, nn.Linear))]:
        weight, bias = layer.weight.detach(), layer.bias.detach()
        fan_out, fan_in = weight.shape[0], weight[0].numel()
        if isinstance(layer, nn.Conv2d):
            fan_out *= 9
        bound = 1.73 * math.sqrt(6 / (fan_in + fan_out))
        assert 0.9 * bound < float(weight.abs().max()) <= bound
        assert float(bias.min()) >= 0.0 and float(bias.max()) <= 0.05
    norms = [m for m in fresh.features if isinstance(m, gbml.CompositeBatchNorm2d)]
    assert len(norms) == 4 and all(m.weight is not None and m.eps == 1e-5 for m in norms)


def test_reference_inner_lr_is_n_times_alpha():
    """The reference code's inner gradient is ∇ Σ_i CE_i / K = N ∇ mean CE over N·K examples."""
    from gbml.training import reference_inner_lr

    generator = torch.Generator().manual_seed(0)
    ways, shots = 5, 2
    logits = torch.randn(ways * shots, ways, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(ways * shots) % ways
    per_example = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    (reference,) = torch.autograd.grad((per_example / shots).sum(), logits, retain_graph=True)
    (mean,) = torch.autograd.grad(per_example.mean(), logits)
    alpha = 0.4
    assert torch.allclose(alpha * reference, reference_inner_lr(alpha, ways) * mean, rtol=1e-14, atol=0)
