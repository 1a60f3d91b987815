"""Correctness guard for continuous batching: each request generated inside a batch (joining and
leaving between steps) produces the same audio as the package generating it alone with the same seed.

Compared per generated token: the latent patch the local DiT produced (what the noise and every LM
step shape; random VAE weights are nearly insensitive to it, so audio alone would prove little)
and the decoded 160 ms audio chunk. Tolerance: identical token counts, max |difference| < 1e-4,
on a float32 tiny checkpoint on CPU (batched matrix products may round differently).
"""
import json

import numpy as np
import pytest
import torch

from service.engines.voxcpm.batch import BatchedGenerator, pick_max_batch

from .support.voxcpm_checkpoint import build_checkpoint

REQUESTS = [  # (text, seed, max_len): different lengths, so rows finish at different steps
    ("Hello world, this is the first request.", 11, 9),
    ("A much longer second request that keeps generating for a good number of steps here.", 22, 16),
    ("Short.", 33, 5),
]
TOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("batch") / "tiny", size="tiny", seed=5, dtype="float32")


@pytest.fixture(scope="module")
def model(ckpt):
    from voxcpm.model.voxcpm import VoxCPMModel

    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["dtype"] == "float32"
    return VoxCPMModel.from_local(str(ckpt), optimize=False, device="cpu")


def alone(model, text, seed, max_len, prompt=None):
    """The package's own streaming generation: [(latent patch [P, D], audio chunk)] per token."""
    torch.manual_seed(seed)
    out = []
    for wav, _, feats in model.generate_with_prompt_cache_streaming(
            target_text=text, prompt_cache=prompt, max_len=max_len, min_len=2, inference_timesteps=4, cfg_value=2.0):
        out.append((feats[-1][0, 0].float().numpy(), wav.squeeze(0).numpy()))
    return out


def run_batched(gen, schedule):
    """schedule: {step_number: [(key, text, seed, max_len)]} requests joining before that step."""
    out, row_of, step = {}, {}, 0
    while True:
        for key, text, seed, max_len in schedule.get(step, []):
            row_of[gen.add(text, None, max_len=max_len, min_len=2, inference_timesteps=4, cfg_value=2.0,
                           seed=seed)] = key
            out[key] = []
        if not gen.active() and step > max(schedule):
            return out
        for row, audio, done in gen.step():
            out[row_of[row]].append((gen.last_patch[row].float().numpy(), audio))
            if done:
                del row_of[row]
        step += 1


def assert_same(batched, reference):
    assert len(batched) == len(reference) > 0
    for (b_feat, b_audio), (r_feat, r_audio) in zip(batched, reference):
        assert b_feat.shape == r_feat.shape and b_audio.shape == r_audio.shape
        assert np.abs(b_feat - r_feat).max() < TOL
        assert np.abs(b_audio - r_audio).max() < TOL


def test_batched_equals_alone_with_joins_and_leaves(model):
    reference = {i: alone(model, t, s, n) for i, (t, s, n) in enumerate(REQUESTS)}
    assert len({len(v) for v in reference.values()}) > 1  # the rows really finish at different steps
    gen = BatchedGenerator(model, record_latents=True, max_batch=3, max_length=256)
    # Two start together; the third joins while they are mid-generation.
    schedule = {0: [(0, *REQUESTS[0]), (1, *REQUESTS[1])], 3: [(2, *REQUESTS[2])]}
    batched = run_batched(gen, schedule)
    for i in range(3):
        assert_same(batched[i], reference[i])
    assert gen.active() == 0 and gen.free_slots() == 3
    # The comparison is sensitive: another seed gives audio far outside the tolerance.
    other = alone(model, REQUESTS[0][0], REQUESTS[0][1] + 1, REQUESTS[0][2])
    assert max(np.abs(a[0] - b[0]).max() for a, b in zip(batched[0], other)) > 100 * TOL


def test_a_freed_row_is_reused_correctly(model):
    gen = BatchedGenerator(model, record_latents=True, max_batch=2, max_length=256)
    first = run_batched(gen, {0: [(0, *REQUESTS[2]), (1, *REQUESTS[1])], 6: [(2, *REQUESTS[0])]})
    assert_same(first[2], alone(model, *REQUESTS[0]))  # joined into the row the short request left


def sine_prompt(model, seconds=2):
    """A voice prompt cache (what the engine builds from an uploaded clip) from a 150 Hz tone."""
    rate = model.sample_rate
    t = torch.arange(rate * seconds) / rate
    wav = (0.3 * torch.sin(2 * torch.pi * 150 * t)).unsqueeze(0)
    patch = model.patch_size * model.chunk_size
    wav = torch.nn.functional.pad(wav, (patch - wav.size(1) % patch, 0))
    feat = model.audio_vae.encode(wav, rate).view(model.audio_vae.latent_dim, -1, model.patch_size).permute(1, 2, 0)
    return {"prompt_text": "A reference clip.", "audio_feat": feat}


def test_with_a_voice_prompt(model):
    prompt = sine_prompt(model)
    reference = alone(model, "Cloned voice output.", 7, 8, prompt)
    gen = BatchedGenerator(model, record_latents=True, max_batch=2, max_length=256)
    other = gen.add("Another request in the same batch.", None, max_len=12, inference_timesteps=4, seed=1)
    row = gen.add("Cloned voice output.", prompt, max_len=8, min_len=2, inference_timesteps=4, cfg_value=2.0, seed=7)
    got = []
    while gen.active():
        got += [(gen.last_patch[r].float().numpy(), audio) for r, audio, _ in gen.step() if r == row]
    assert other != row
    assert_same(got, reference)


def test_cancel_full_and_empty(model):
    gen = BatchedGenerator(model, record_latents=True, max_batch=2, max_length=128)
    assert gen.step() == []
    a = gen.add("one", max_len=50, inference_timesteps=4, seed=1)
    gen.add("two", max_len=50, inference_timesteps=4, seed=2)
    with pytest.raises(RuntimeError, match="no free batch slot"):
        gen.add("three", inference_timesteps=4)
    gen.cancel(a)
    assert gen.free_slots() == 1
    assert [r for r, _, _ in gen.step()] == [1]
    with pytest.raises(ValueError, match="inference_timesteps must be between 1 and 100"):
        gen.add("four", inference_timesteps=101)


def test_pick_max_batch_scales_with_memory(model):
    small = pick_max_batch(1 << 30, model, cap=64)
    big = pick_max_batch(64 << 30, model, cap=64)
    assert 1 <= small <= big <= 64


def test_fixed_tokens_force_the_same_length_on_every_path(model, tmp_path_factory):
    """VOXCPM_FIXED_TOKENS (benchmarks): serial, streaming and batched generation all produce exactly
    N tokens, also past the package's cap of 6 tokens per text token + 10 for a short text."""
    from service.engines.base import SynthesisParams
    from service.engines.voxcpm.engine import VoxCPMEngine

    n, text = 30, "Hi."  # "Hi." is a few text tokens: capped near 22 tokens without the setting
    ckpt = build_checkpoint(tmp_path_factory.mktemp("fixed") / "tiny", size="tiny", seed=5, dtype="float32")
    engine = VoxCPMEngine(ckpt, device="cpu", compile_mode="off", inference_timesteps=2, fixed_tokens=n)
    engine.load()
    patch = engine._model.patch_size * engine._model.chunk_size
    params = SynthesisParams(seed=3)
    assert sum(c.size for c in engine.stream(text, "default", None, params)) == n * patch
    assert engine.synthesize(text, "default", None, params).size == n * patch
    batch = engine.make_batch(2)
    [row] = engine.batch_add(batch, [(text, None, params)])
    steps = 0
    while batch.active():
        steps += sum(1 for r, _, _ in batch.step() if r == row)
    assert steps == n
    assert engine.info().details["fixed_tokens"] == n

    unfixed = VoxCPMEngine(ckpt, device="cpu", compile_mode="off", inference_timesteps=2)
    unfixed._model = engine._model  # same weights; only the setting differs
    assert sum(c.size for c in unfixed.stream(text, "default", None, SynthesisParams(seed=3))) < n * patch


def test_requests_prefilled_together_equal_each_alone(model):
    """add_many: one padded prefill for requests of different lengths (one with a voice prompt),
    joining a batch that already has a row mid-generation."""
    from service.engines.voxcpm.batch import Join

    prompt = sine_prompt(model)
    cases = [(REQUESTS[1][0], 22, 12, None), ("Short.", 33, 6, None), ("Cloned voice output.", 7, 8, prompt)]
    reference = [alone(model, text, seed, n, p) for text, seed, n, p in cases]
    gen = BatchedGenerator(model, record_latents=True, max_batch=4, max_length=256)
    first = gen.add(REQUESTS[0][0], None, max_len=10, min_len=2, inference_timesteps=4, seed=11)
    gen.step()
    rows = gen.add_many([Join(text, p, max_len=n, min_len=2, inference_timesteps=4, cfg_value=2.0, seed=seed)
                         for text, seed, n, p in cases])
    assert first not in rows and len(set(rows)) == 3
    got = {row: [] for row in rows}
    while gen.active():
        for row, audio, _ in gen.step():
            if row in got:
                got[row].append((gen.last_patch[row].float().numpy(), audio))
    for row, ref in zip(rows, reference):
        assert_same(got[row], ref)
    with pytest.raises(RuntimeError, match="no free batch slot"):
        BatchedGenerator(model, record_latents=True, max_batch=1, max_length=64).add_many([Join("a"), Join("b")])


def test_rows_with_different_step_counts_share_a_step(model):
    """Per-row time grids: a 2-step, a 4-step and a 7-step request in one batch each equal the
    package generating it alone with its own inference_timesteps."""
    cases = [(REQUESTS[0][0], 11, 6, 2), (REQUESTS[1][0], 22, 8, 7), ("Short.", 33, 5, 4)]

    def alone_steps(text, seed, max_len, steps):
        torch.manual_seed(seed)
        return [(f[-1][0, 0].float().numpy(), w.squeeze(0).numpy()) for w, _, f in
                model.generate_with_prompt_cache_streaming(target_text=text, prompt_cache=None, max_len=max_len,
                                                           min_len=2, inference_timesteps=steps, cfg_value=2.0)]

    gen = BatchedGenerator(model, record_latents=True, max_batch=4, max_length=256)
    handles = [gen.add(t, None, max_len=n, min_len=2, inference_timesteps=k, cfg_value=2.0, seed=s)
               for t, s, n, k in cases]
    got = {h: [] for h in handles}
    while gen.active():
        for row, audio, _ in gen.step():
            got[row].append((gen.last_patch[row].float().numpy(), audio))
    for h, case in zip(handles, cases):
        assert_same(got[h], alone_steps(*case))


def test_padding_rows_change_nothing(model):
    """Three live rows run in the bucket of four; the idle row is filled with NaN and huge values,
    and the live rows still equal the package's own generation."""
    gen = BatchedGenerator(model, record_latents=True, max_batch=8, max_length=256)
    assert gen.buckets == (1, 2, 4, 8)
    rows = [gen.add(t, None, max_len=n, min_len=2, inference_timesteps=4, cfg_value=2.0, seed=s)
            for t, s, n in REQUESTS]
    for t in (gen.lm_hidden, gen.res_hidden, gen.cond):
        t[3:] = float("nan")
    gen.base_kv[:, :, 3:] = 1e30
    assert gen.shapes()[0] == 4
    got = {r: [] for r in rows}
    while gen.active():
        for row, audio, _ in gen.step():
            got[row].append((gen.last_patch[row].float().numpy(), audio))
    for row, (text, seed, n) in zip(rows, REQUESTS):
        assert_same(got[row], alone(model, text, seed, n))


def test_prepare_leaves_the_idle_batch_as_it_found_it(model):
    """prepare() runs every part of the step at every bucket on the idle batch (capturing graphs on CUDA);
    rows joining afterwards still equal the package's own generation."""
    gen = BatchedGenerator(model, record_latents=True, max_batch=4, max_length=256)
    assert gen.prepare(timesteps=4) == 0  # graphs only on CUDA
    out = run_batched(gen, {0: [("a", *REQUESTS[0])], 1: [("b", *REQUESTS[2])]})
    assert_same(out["a"], alone(model, *REQUESTS[0]))
    assert_same(out["b"], alone(model, *REQUESTS[2]))


def test_a_seeded_request_leaves_the_other_rows_random(ckpt):
    """A request's seed seeds its own row's generator only: an unseeded request joining beside it draws
    fresh noise every time (the process-wide RNG is not reseeded: other models' inference threads use it)."""
    from service.engines import SynthesisParams
    from service.engines.voxcpm.engine import VoxCPMEngine

    engine = VoxCPMEngine(ckpt, device="cpu", compile_mode="off", inference_timesteps=2, max_len=8)
    engine.load()
    noise = []
    for _ in range(2):
        batch = engine.make_batch(2)
        engine.batch_add(batch, [("Seeded.", None, SynthesisParams(seed=7)), ("Not seeded.", None, SynthesisParams())])
        noise.append(batch.noise[:2].clone())
    assert torch.equal(noise[0][0], noise[1][0])  # the seeded row repeats itself
    assert not torch.equal(noise[0][1], noise[1][1])


def test_a_join_failing_part_way_leaves_no_row_behind(model):
    """add_many fails on its second request (a seed the generator cannot take, standing in for a device
    out of memory): the first request's row is not left generating with no owner, the failed row is not
    left advancing as live padding, and the batch then serves as if nothing had happened."""
    from service.engines.voxcpm.batch import Join

    gen = BatchedGenerator(model, record_latents=True, max_batch=4, max_length=256)
    with pytest.raises(ValueError):
        gen.add_many([Join(REQUESTS[0][0], seed=1), Join(REQUESTS[1][0], seed=2**64)])
    assert gen.active() == 0 and int(gen.live.sum()) == 0 and int(gen.pos.abs().sum()) == 0
    out = run_batched(gen, {0: [("a", *REQUESTS[2])]})
    assert_same(out["a"], alone(model, *REQUESTS[2]))


def test_a_rows_audio_holds_only_its_own_samples(model):
    """Each row's piece of a step owns its samples: the scheduler keeps one row's pieces for a whole
    sentence (to stretch or carry it), which must not keep the other rows' audio of every step alive."""
    gen = BatchedGenerator(model, max_batch=4, max_length=256)
    for text, seed, n in REQUESTS:
        gen.add(text, None, max_len=n, inference_timesteps=4, seed=seed)
    out = gen.step()
    assert len(out) == 3
    assert all(r.audio.base is None and r.audio.shape == (gen.family.samples_per_token,) for r in out)


def test_the_step_has_no_host_sync_and_no_data_dependent_python(model):
    """Each part of the step traces as one graph (fullgraph: any .item(), .tolist(), or Python
    branch on a tensor value would break it), so it can be captured in a CUDA graph."""
    gen = BatchedGenerator(model, max_batch=4, max_length=512)
    gen.add(REQUESTS[0][0], None, max_len=8, inference_timesteps=4, seed=1)
    b, length, iters = gen.shapes()
    assert (b, length, iters) == (1, 256, 4)
    torch._dynamo.reset()
    with torch.inference_mode():
        for fn, args in ((gen.dit_step, (b, iters)), (gen.lm_step, (b, length)), (gen.vae_step, (b,))):
            torch.compile(fn, fullgraph=True, backend="eager")(*args)


def test_streaming_decode_equals_decoding_the_whole_sequence(model):
    """The carried-state VAE decode, one patch per step, gives the samples of one decode of the whole
    latent sequence; priming with a prompt's patches equals decoding them ahead and cutting them off."""
    from einops import rearrange

    from service.engines.voxcpm.vae_stream import StreamingDecoder

    vae = model.audio_vae
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 10, model.patch_size, vae.latent_dim, generator=gen)  # [b, t, P, D]
    with torch.inference_mode():
        whole = vae.decode(rearrange(latents, "b t p d -> b d (t p)"))
        dec = StreamingDecoder(vae, max_rows=3, device="cpu")
        dec.prime(1, rearrange(latents[1, :2], "t p d -> d (t p)"))
        dec.prime(0, rearrange(latents[0, :2], "t p d -> d (t p)"))
        pieces = [dec.decode(latents[:, t].transpose(1, 2)) for t in range(2, 10)]
    streamed = torch.cat(pieces, dim=-1)
    hop = model.patch_size * model.chunk_size
    assert streamed.shape == whole[..., 2 * hop:].shape
    assert (streamed - whole[..., 2 * hop:]).abs().max() < 1e-6
    assert whole[..., 2 * hop:].abs().max() > 1e-4  # the audio is not silence


def test_buckets():
    from service.engines.voxcpm.batch import batch_buckets, bucket_for, length_buckets

    assert batch_buckets(1) == (1,)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert length_buckets(4096) == (256, 512, 1024, 2048, 4096)
    assert length_buckets(200) == (200,)
    assert bucket_for(1, (1, 2, 4)) == 1 and bucket_for(3, (1, 2, 4)) == 4
    with pytest.raises(ValueError):
        bucket_for(5, (1, 2, 4))


def test_compiled_step_parts_equal_eager_across_buckets(model):
    """VOXCPM_COMPILE_STEP: the step's parts wrapped in torch.compile (the eager backend here: the
    same tracing and recompiles as inductor, without its minutes of C++ compilation on this CPU)
    give the same rows, through a change of batch bucket (1 -> 4 rows)."""
    def run(backend):
        torch._dynamo.reset()
        gen = BatchedGenerator(model, record_latents=True, max_batch=4, max_length=256, compile_backend=backend)
        rows = [gen.add(REQUESTS[1][0], None, max_len=8, min_len=8, inference_timesteps=4, seed=5, length_ratio=None)]
        got = []
        for i in range(6):
            if i == 2:
                rows += gen.add_many([Join(t, None, max_len=8, inference_timesteps=4, seed=s) for t, s, _ in REQUESTS])
            got += [gen.last_patch[r.row].float().numpy() for r in gen.step() if r.row == rows[0]]
        return np.stack(got)

    from service.engines.voxcpm.batch import Join

    assert np.abs(run("eager") - run(None)).max() < TOL


def test_both_batches_keep_the_declared_contract(model, tmp_path_factory):
    """The scheduler's batch loop drives any GenerationBatch from a BatchingEngine (service/engines/base.py):
    VoxCPM's and the fake engine's the fast tests use."""
    from service.engines.base import BatchingEngine, GenerationBatch
    from service.engines.voxcpm.engine import VoxCPMEngine

    from .support.slow_engine import SlowEngine

    assert isinstance(BatchedGenerator(model, max_batch=2, max_length=64), GenerationBatch)
    assert isinstance(VoxCPMEngine(tmp_path_factory.mktemp("none")), BatchingEngine)
    fake = SlowEngine(0.001, 2)
    assert isinstance(fake, BatchingEngine) and isinstance(fake.make_batch(2), GenerationBatch)


def test_a_reference_prompt_needs_voxcpm2(model):
    """Reference-clip prompts are VoxCPM2's (family.py); a VoxCPM-1.5 batch refuses one by name rather
    than generating from a sequence the model was never trained on."""
    from service.engines.voxcpm.batch import Join

    gen = BatchedGenerator(model, max_batch=1, max_length=64)
    assert not gen.family.v2 and gen.family.samples_per_token == model.patch_size * model.chunk_size
    ref = {"mode": "reference", "ref_audio_feat": torch.zeros(3, model.patch_size, model.audio_vae.latent_dim)}
    with pytest.raises(ValueError, match="reference prompts need a VoxCPM2 model; this is voxcpm"):
        gen.add_many([Join("Hello.", ref)])
    assert gen.active() == 0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_a_graph_capture_leaves_other_inference_threads_free():
    """Two models in one worker each have an inference thread: while one captures the step's graphs, the
    other allocates and synchronises; neither fails, and the captured graphs replay the work."""
    import threading

    from service.engines.voxcpm.batch import GraphCache

    dev = torch.device("cuda")
    stop, errors = threading.Event(), []

    def other_model():
        size = 1
        while not stop.is_set():
            try:
                size = size % 4096 + 1  # new sizes: the allocator goes to the driver now and then
                assert torch.ones(size * 1024, device=dev).sum().item() == size * 1024
                torch.cuda.synchronize(dev)
            except Exception as e:  # noqa: BLE001 - reported by the test below
                errors.append(e)
                return

    x = torch.zeros(64, device=dev)
    cache = GraphCache(True, dev)
    thread = threading.Thread(target=other_model)
    thread.start()
    try:
        for key in range(20):
            cache.run(key, lambda: x.add_(1))  # eager, then captured
            cache.run(key, lambda: x.add_(1))  # replayed
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert cache.enabled and len(cache.graphs) == 20
    assert torch.equal(x, torch.full_like(x, 40))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphs_are_captured_on_the_batchs_own_device():
    """A model on cuda:1 driven from a thread whose current device is cuda:0: the graph records its work
    (captured on cuda:0's stream it would record nothing and run the step once more, eagerly)."""
    from service.engines.voxcpm.batch import GraphCache

    torch.cuda.set_device(0)
    x = torch.zeros(8, device="cuda:1")
    cache = GraphCache(True, torch.device("cuda:1"))
    cache.run("k", lambda: x.add_(1))
    torch.cuda.synchronize(1)
    assert torch.equal(x, torch.ones_like(x))  # the eager call only
    cache.run("k", lambda: x.add_(1))
    torch.cuda.synchronize(1)
    assert torch.equal(x, torch.full_like(x, 2))  # the replay did the work
