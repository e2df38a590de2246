import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. It must be switched on before
# the kernel modules are imported (triton.jit reads it when a kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The compatibility run (tests/test_compat.py) runs suites against a Megatron-LM checkout; make sure
# that is the megatron-core they import, not the installed wheel.
_expected = os.environ.get("MHC_MEGATRON_EXPECT_CHECKOUT")
if _expected:
    import megatron.core

    if not os.path.realpath(megatron.core.__file__).startswith(os.path.realpath(_expected)):
        pytest.exit(f"expected megatron-core from {_expected}, imported {megatron.core.__file__}", returncode=3)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, but reproducible from the printed seed on failure."""
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("torch_seed", seed))
    yield


@pytest.fixture(scope="session")
def _megatron_process_group():
    """A single-process gloo world with megatron-core's model-parallel state (TP = PP = 1), kept
    for the session (it changes no megatron-core attribute)."""
    import torch.distributed as dist

    from mcore_helpers import free_port, init_megatron

    init_megatron(0, 1, free_port())
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture
def megatron_world(_megatron_process_group):
    """The single-process world, with megatron-core's CUDA-only spots redirected to the CPU for
    this test only (``mcore_helpers.cpu_redirected``: every original is back after the test)."""
    from mcore_helpers import cpu_redirected

    with cpu_redirected():
        yield
