"""Sparse for real: an export holds only the active weights and loads back as the
same model; batch-1 engines give the dense model's log-probabilities with
sparse products; sizes, the kernel choice and bad files."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numba
import numpy as np
import pytest

from conftest import make_tiny_config
from selfish_jax import models
from selfish_jax.inference import engines, export, kernels, matrices
from selfish_jax.training import language_model_steps as lm_steps
from selfish_jax.training import parallel
from selfish_jax.training.language_modelling import LanguageModelling, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {
    'lstm': dict(emsize=8, nhid=12, nlayers=2),
    'rhn': dict(emsize=12, nhid=12, nlayers=1, rhn_depth=3, tied=True),
    'onlstm': dict(emsize=8, nhid=12, nlayers=3, chunk_size=4, tied=True, weight_drop=0.2),
    'awd_lstm_mos': dict(emsize=8, nhid=12, nhid_last=10, nlayers=3, n_experts=3, tied=True),
}


@pytest.fixture(scope='module')
def runs(text_corpus_dir, tmp_path_factory):
  """A finished run of each family (one short epoch, averaging from the start,
  so the best weights are averages): ``{family: (config, workdir, final record)}``."""
  result = {}
  for family, sizes in FAMILIES.items():
    config = make_tiny_config(text_corpus_dir, dataset='text')
    config.update(model=family, num_epochs=1, max_steps_per_epoch=3, asgd_start_epoch=1,
                  **sizes)
    workdir = tmp_path_factory.mktemp(family)
    result[family] = (config, workdir, train_and_evaluate(config, str(workdir)))
  return result


def _test_loss(config, params):
  task = LanguageModelling(config, parallel.make_mesh(1))
  evaluate = jax.jit(lm_steps.make_evaluate(task.model, task.test_batch_size))
  return float(evaluate(jax.tree.map(jnp.asarray, params), task.test_windows))


@pytest.mark.parametrize('family', list(FAMILIES))
def test_an_export_loads_back_as_the_same_model(runs, family, tmp_path):
  config, workdir, final = runs[family]
  header = export.export_run(str(workdir), str(tmp_path / 'f32.npz'))
  loaded = export.load_export(str(tmp_path / 'f32.npz'))
  assert loaded.family == family and loaded.config['density'] == 0.33
  assert _test_loss(config, loaded.params) == final['test_loss']  # bit for bit
  # Only the masked matrices' nonzero entries are stored.
  sparse = [leaf for leaf in header['leaves'] if leaf['storage'] != 'dense']
  assert {tuple(leaf['path']) for leaf in sparse} == export.masked_paths(loaded.masks)
  assert all(leaf['count'] <= 0.33 * np.prod(leaf['shape']) + 1 for leaf in sparse)
  # bfloat16 values: half the bytes of the values, the test loss to bfloat16's rounding.
  small = export.export_run(str(workdir), str(tmp_path / 'bf16.npz'), dtype='bfloat16')
  assert small['bytes'] < header['bytes']
  rounded = _test_loss(config, export.load_export(str(tmp_path / 'bf16.npz')).params)
  assert rounded == pytest.approx(final['test_loss'], rel=1e-2)


@pytest.mark.parametrize('family', list(engines.ENGINES))
@pytest.mark.parametrize('kernel', ['bitmap', 'csr', 'dense', 'auto'])
def test_an_engine_gives_the_models_log_probabilities(runs, family, kernel, tmp_path):
  config, workdir, _ = runs[family]
  export.export_run(str(workdir), str(tmp_path / 'model.npz'))
  loaded = export.load_export(str(tmp_path / 'model.npz'))
  engine = engines.engine_for(loaded, kernel)
  if kernel != 'auto':
    assert {m.kernel for n, m in engine.matrices.items()} == {kernel}
  assert not any(matrix.undecided for matrix in engine.matrices.values())
  tokens = np.array([0, 3, 5, 1, 1, 7, 2, 9, 4, 0, 6, 8])
  model = models.build_model(config, len(loaded.vocab))
  logits, _ = models.logits(model, jax.tree.map(jnp.asarray, loaded.params),
                            jnp.asarray(tokens)[None], model.initial_carry(1))
  np.testing.assert_allclose(engine.log_probs(tokens), jax.nn.log_softmax(logits[0]),
                             rtol=1e-5, atol=2e-6)
  assert engine.generate([1, 2], 5, temperature=0) == engine.generate([1, 2], 5, temperature=0)


def test_a_family_without_an_engine_says_so(runs, tmp_path, monkeypatch):
  monkeypatch.delitem(engines.ENGINES, 'awd_lstm_mos')  # as a family registered from outside
  export.export_run(str(runs['awd_lstm_mos'][1]), str(tmp_path / 'model.npz'))
  with pytest.raises(Exception, match=r"no batch-1 sparse engine for the family 'awd_lstm_mos'"):
    engines.engine_for(export.load_export(str(tmp_path / 'model.npz')))


def test_sizes_follow_the_storage_arithmetic(tmp_path):
  rng = np.random.default_rng(0)
  weights = rng.standard_normal((1000, 1000)).astype(np.float32)
  for density, storage, index_bytes in ((0.33, 'bitmap', 1_000_000 // 8),
                                        (0.02, 'indices', 4 * 20_000)):
    mask = np.zeros(1_000_000, bool)
    mask[rng.choice(1_000_000, int(density * 1_000_000), replace=False)] = True
    params = {'w': weights * mask.reshape(1000, 1000), 'b': np.ones(1000, np.float32)}
    for dtype, value_bytes in (('float32', 4), ('bfloat16', 2)):
      path = str(tmp_path / f'{density}-{dtype}.npz')
      header = export.write_export(path, params, {('w',)}, {}, ['a'], dtype)
      [w] = [leaf for leaf in header['leaves'] if leaf['path'] == ['w']]
      count = int(mask.sum())
      assert (w['storage'], w['count']) == (storage, count)
      payload = count * value_bytes + index_bytes + 1000 * value_bytes  # + the dense bias
      assert payload < os.path.getsize(path) < payload + 4096  # the zip's headers
      back = export.load_export(path).params['w']
      if dtype == 'float32':
        np.testing.assert_array_equal(back, params['w'])
      else:
        np.testing.assert_allclose(back, params['w'], rtol=2 ** -8)
  # At density 0.33 the file is at most half the dense one (a third with bfloat16).
  dense = 4 * (1_000_000 + 1000)
  assert os.path.getsize(tmp_path / '0.33-float32.npz') <= dense / 2
  assert os.path.getsize(tmp_path / '0.33-bfloat16.npz') <= dense / 3


def test_the_kernel_is_the_faster_one_measured_per_matrix():
  # One thread: the other xdist workers hold the other cores, and a parallel product
  # waits for its slowest thread (a descheduled one costs milliseconds).
  threads = numba.get_num_threads()
  numba.set_num_threads(1)
  try:
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((1500, 4000)).astype(np.float32)
    for density in (0.003, 0.9):
      mask = rng.random(weights.shape) < density
      matrix = matrices.Matrix(weights * mask, mask, 'auto')
      assert set(matrix.timings) == {'bitmap', 'csr', 'dense'}
      assert matrix.kernel == min(matrix.timings, key=matrix.timings.get)
      x = rng.standard_normal(1500).astype(np.float32)
      np.testing.assert_allclose(matrix.product(x), x @ (weights * mask), rtol=1e-4, atol=1e-4)
    # Far from the crossover the choice is clear-cut.
    sparse = matrices.Matrix(weights * (rng.random(weights.shape) < 0.003), None, 'auto')
    assert sparse.kernel == 'dense'  # no mask: a dense matrix stays dense
    very_sparse = rng.random(weights.shape) < 0.003
    assert matrices.Matrix(weights * very_sparse, very_sparse, 'auto').kernel == 'csr'
  finally:
    numba.set_num_threads(threads)


@pytest.mark.parametrize('portable', [False, True])
def test_the_sparse_layouts_multiply_and_look_up_exactly_their_active_weights(portable):
  rng = np.random.default_rng(2)
  # Odd shapes (not whole blocks, gathers or loop iterations), an empty row and a full one;
  # more columns than 16-bit indices hold.
  for rows, columns, density in ((5, 7, 0.5), (33, 100, 0.3), (70, 1000, 0.05), (3, 70_000, 0.01)):
    mask = rng.random((rows, columns)) < density
    mask[1], mask[-1] = False, True
    weights = (rng.standard_normal((rows, columns)) * mask).astype(np.float32)
    active = int(mask.sum())
    bitmap = kernels.bitmap_rows(weights, mask)
    assert bitmap.padded_columns % (kernels.LANES * kernels.UNROLL) == 0
    assert bitmap.padded_columns - columns < kernels.LANES * kernels.UNROLL
    assert bitmap.nbytes == 4 * (active + 16) + 8 * (rows + 1) + 2 * rows * bitmap.padded_columns // 16
    compressed = kernels.compressed_rows(weights, mask)
    index_bytes = 2 if columns <= 65_536 else 4
    assert compressed.columns_of.itemsize == index_bytes
    assert compressed.nbytes == (4 + index_bytes) * active + 8 * (rows + 1)
    x = rng.standard_normal(columns).astype(np.float32)
    exact = weights.astype(np.float64) @ x
    for layout in (bitmap, compressed):
      product = kernels.product(layout, x, portable)
      np.testing.assert_allclose(product, exact, rtol=1e-5, atol=1e-5)
      assert product[1] == 0.0
      for index in (0, 1, rows - 1):
        np.testing.assert_array_equal(kernels.row(layout, index), weights[index])
  # Rows with every count of stored weights around the gathers' 16 and 32 and the blocks' 64,
  # and a matrix with none.
  counts = (0, 1, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 100)
  mask = np.zeros((len(counts), 100), bool)
  for row, count in enumerate(counts):
    mask[row, rng.choice(100, count, replace=False)] = True
  for mask in (mask, np.zeros((5, 7), bool)):
    weights = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
    x = rng.standard_normal(mask.shape[1]).astype(np.float32)
    for layout in (kernels.bitmap_rows(weights, mask), kernels.compressed_rows(weights, mask)):
      np.testing.assert_allclose(kernels.product(layout, x, portable),
                                 weights.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


def _prints_agree(script: str, **environment: str) -> None:
  """Runs ``script`` in a fresh Python (the package importable, ``environment`` set);
  it must exit cleanly having printed only ``agree``."""
  result = subprocess.run([sys.executable, '-c', script],
                          env=dict(os.environ, PYTHONPATH=ROOT, **environment),
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0 and result.stdout.strip() == 'agree', result.stderr[-2000:]


def test_the_portable_kernels_compile_and_agree_for_a_cpu_without_avx512():
  # numba compiles for a generic x86-64 (no AVX-512): the intrinsics must not be used there.
  script = """if True:
    import numpy as np
    from selfish_jax.inference import kernels
    assert not kernels._has_avx512()
    rng = np.random.default_rng(0)
    mask = rng.random((40, 300)) < 0.2
    weights = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
    x = rng.standard_normal(300).astype(np.float32)
    for layout in (weights, kernels.bitmap_rows(weights, mask), kernels.compressed_rows(weights, mask)):
      np.testing.assert_allclose(kernels.product(layout, x), weights @ x, rtol=1e-5, atol=1e-5)
    print('agree')
  """
  _prints_agree(script, NUMBA_CPU_NAME='generic')


def test_a_process_forked_after_products_multiplies_without_numbas_threads():
  # A scoring script of a user's: products in the parent, then a fork pool (no JAX in it,
  # which warns about any fork). Before, the children aborted in numba's OpenMP pool and
  # the pool waited for them forever.
  script = """if True:
    import multiprocessing
    import numpy as np
    from selfish_jax.inference import kernels

    def first(layout, x):
      return float(kernels.product(layout, x)[0])

    rng = np.random.default_rng(6)
    mask = rng.random((2000, 300)) < 0.3
    weights = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
    x = rng.standard_normal(300).astype(np.float32)
    layouts = [weights, kernels.bitmap_rows(weights, mask), kernels.compressed_rows(weights, mask)]
    expected = [first(layout, x) for layout in layouts]  # numba's threads start here
    with multiprocessing.get_context('fork').Pool(2) as pool:
      got = pool.starmap_async(first, [(layout, x) for layout in layouts]).get(timeout=120)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    print('agree')
  """
  _prints_agree(script)


def test_every_kernel_gives_the_same_products_and_rows():
  rng = np.random.default_rng(3)
  mask = rng.random((300, 200)) < 0.2
  weights = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
  x, xs = rng.standard_normal(300).astype(np.float32), rng.standard_normal((3, 300)).astype(np.float32)
  for kernel in matrices.KERNELS[1:]:
    product, lookup = matrices.Matrix(weights, mask, kernel), matrices.Matrix(weights, mask, kernel, lookups=True)
    assert product.kernel == lookup.kernel == kernel
    np.testing.assert_allclose(product.product(x), x @ weights, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(product.product(xs), xs @ weights, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(lookup.row(17), weights[17])
  with pytest.raises(ValueError, match=r"unknown kernel 'sparse'; expected one of \('auto', 'bitmap'"):
    matrices.Matrix(weights, mask, 'sparse')


def test_layouts_are_chosen_in_passes_over_the_model_as_a_step_reads_it(monkeypatch):
  rng = np.random.default_rng(5)
  model = []
  for shape, density, lookups in (((50, 40), 0.3, True), ((40, 80), 0.1, False),
                                  ((80, 60), 0.5, False)):
    mask = rng.random(shape) < density
    model.append(matrices.Matrix((rng.standard_normal(shape) * mask).astype(np.float32), mask,
                                 'auto', lookups=lookups, choose=False))
  assert all(matrix.undecided == ('bitmap', 'csr', 'dense') for matrix in model)
  calls, use = [], matrices.Matrix._use
  monkeypatch.setattr(matrices.Matrix, '_use', lambda self, kernel: (
      calls.append((model.index(self), kernel)), use(self, kernel)))
  matrices.choose_layouts(model)
  # Every pass visits the model's matrices in order, all in one layout; warm-up passes included.
  passes = [calls[start:start + 3] for start in range(0, len(calls), 3)]
  assert len(passes) == matrices._ROUNDS * 3 * (matrices._PASSES + 1)
  assert all([index for index, _ in one] == [0, 1, 2] and len({k for _, k in one}) == 1
             for one in passes)
  for matrix in model:
    assert matrix.undecided == () and set(matrix.timings) == {'bitmap', 'csr', 'dense'}
    assert matrix.kernel == min(matrix.timings, key=matrix.timings.get)
  # A matrix left undecided and used on its own measures itself first.
  monkeypatch.undo()
  mask = rng.random((30, 20)) < 0.2
  weights = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
  alone = matrices.Matrix(weights, mask, choose=False)
  x = rng.standard_normal(30).astype(np.float32)
  np.testing.assert_allclose(alone.product(x), x @ weights, rtol=1e-5, atol=1e-6)
  assert alone.undecided == () and alone.kernel in ('bitmap', 'csr', 'dense')


def test_without_numba_every_matrix_stays_dense_and_sparse_kernels_say_why(monkeypatch):
  rng = np.random.default_rng(4)
  mask = rng.random((300, 200)) < 0.01
  weights = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
  monkeypatch.setattr(kernels, 'numba', None)
  matrix = matrices.Matrix(weights, mask, 'auto')
  assert (matrix.kernel, matrix.timings) == ('dense', {})
  x = rng.standard_normal(300).astype(np.float32)
  np.testing.assert_allclose(matrix.product(x), x @ weights, rtol=1e-5, atol=1e-6)
  for kernel in ('bitmap', 'csr'):
    with pytest.raises(ValueError, match=f"kernel '{kernel}' needs numba"):
      matrices.Matrix(weights, mask, kernel)


def test_bad_exports_and_runs_are_one_error_naming_them(runs, tmp_path):
  config, workdir, _ = runs['lstm']
  good = tmp_path / 'good.npz'
  export.export_run(str(workdir), str(good))
  data = good.read_bytes()
  (tmp_path / 'cut.npz').write_bytes(data[:len(data) // 2])
  with pytest.raises(export.ExportError, match=rf'^{tmp_path}/cut.npz is not a readable '
                     'selfish_jax export'):
    export.load_export(str(tmp_path / 'cut.npz'))
  with np.load(good) as archive:
    arrays = {name: archive[name] for name in archive.files}
  header = json.loads(arrays['header'].tobytes())
  header['version'] = export.FORMAT_VERSION + 1
  arrays['header'] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  np.savez(tmp_path / 'newer.npz', **arrays)
  with pytest.raises(export.ExportError, match=rf'^{tmp_path}/newer.npz is export format '
                     rf'version {export.FORMAT_VERSION + 1}; this selfish_jax reads versions up '
                     rf'to {export.FORMAT_VERSION}'):
    export.load_export(str(tmp_path / 'newer.npz'))
  # A run that has not finished an epoch has no best weights to export (one line, by the CLI).
  young = tmp_path / 'young'
  young.mkdir()
  (young / 'config.json').write_text((workdir / 'config.json').read_text())
  result = subprocess.run([sys.executable, '-m', 'experiments.export', f'--workdir={young}',
                           f'--out={tmp_path / "x.npz"}'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: {young} has no best weights yet (no epoch finished)')
  assert not (tmp_path / 'x.npz').exists()
