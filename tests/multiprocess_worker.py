"""One of two processes (4 CPU devices each) running the sharded losses across processes.

Run by ``test_multiprocess.py`` as ``python multiprocess_worker.py PROCESS_ID PORT``. Each process
builds the same global arrays, places its part with ``jax.make_array_from_callback`` on a 2 x 4
mesh spanning both processes (data over processes, vocabulary over each process's devices), and
checks the losses and the gradient shards it holds against the unsharded computation on one
local device. Prints ``OK <process id>`` on success.
"""

import os
import sys


def main(process_id: int, port: int) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxsce

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

    rng = np.random.default_rng(0)
    T, D, V = 16, 8, 1000
    hidden = rng.normal(size=(T, D)).astype(np.float32)
    weight = (rng.normal(size=(D, V)) * 0.3).astype(np.float32)
    labels = rng.integers(0, V, size=T).astype(np.int32)

    def place(mesh, x, *spec):
        sharding = NamedSharding(mesh, P(*spec))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def check_shards(got, want, what):
        for shard in got.addressable_shards:
            np.testing.assert_allclose(np.asarray(shard.data), want[shard.index], rtol=2e-5, atol=1e-6, err_msg=what)

    opts = dict(label_smoothing=0.1)
    with jax.default_device(jax.local_devices()[0]):
        want, (want_dh, want_dw) = jax.value_and_grad(
            lambda h, w: jaxsce.linear_cross_entropy(h, w, labels, **opts), argnums=(0, 1)
        )(hidden, weight)
        want_lp = jaxsce.linear_log_probs(hidden, weight, labels)
        want, want_dh, want_dw, want_lp = (np.asarray(x) for x in (want, want_dh, want_dw, want_lp))

    # The wrapper on an Auto mesh.
    auto = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    h, w, y = place(auto, hidden, "data"), place(auto, weight, None, "model"), place(auto, labels, "data")

    def wrapped(h, w, y):
        return jaxsce.sharded_linear_cross_entropy(h, w, y, mesh=auto, vocab_axis="model", batch_axes="data", **opts)

    loss, (dh, dw) = jax.jit(jax.value_and_grad(wrapped, argnums=(0, 1)))(h, w, y)
    check_shards(loss, want, "sharded_linear_cross_entropy")
    check_shards(dh, want_dh, "d hidden")
    check_shards(dw, want_dw, "d weight")

    # A direct call on Explicit-sharded inputs.
    if hasattr(jax.sharding, "reshard"):
        mesh = jax.make_mesh((2, 4), ("data", "model"))
        h, w, y = place(mesh, hidden, "data"), place(mesh, weight, None, "model"), place(mesh, labels, "data")
        with jax.set_mesh(mesh):
            step = jax.jit(jax.value_and_grad(lambda h, w, y: jaxsce.linear_cross_entropy(h, w, y, **opts), (0, 1)))
            loss, (dh, dw) = step(h, w, y)
            lp = jax.jit(lambda h, w, y: jaxsce.linear_log_probs(h, w, y))(h, w, y)
        check_shards(loss, want, "linear_cross_entropy (explicit)")
        check_shards(dh, want_dh, "d hidden (explicit)")
        check_shards(dw, want_dw, "d weight (explicit)")
        check_shards(lp, want_lp, "linear_log_probs (explicit)")

    jax.distributed.shutdown()
    print(f"OK {process_id}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
