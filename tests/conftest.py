"""Shared test helpers: small U-Net configurations and a loopback HTTP server."""
import functools
import http.server
import socket
import threading

import pytest
import torch

import ddpm_mini

#: A small U-Net that exercises every option: per-level res blocks and heads,
#: attention on two levels, several in/out channels.
SMALL_UNET = dict(spatial_dims=3, in_channels=2, out_channels=3, channels=(8, 16, 24),
                  attention_levels=(False, True, True), num_res_blocks=(1, 2, 3),
                  num_head_channels=(4, 4, 8), norm_num_groups=4)

#: The smallest useful model for sampler and CLI tests.
TINY_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16),
                 attention_levels=(False, True), num_res_blocks=1, num_head_channels=4, norm_num_groups=4)


def randomize(model, seed=0, scale=0.05):
    """Give every parameter random values (MONAI zero-initialises some convolutions,
    which would hide wiring mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/'www' on 127.0.0.1; yields (folder, base_url)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port():
    """A loopback port with nothing listening (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def standin_weights(tmp_path_factory):
    """One stand-in MedForj file (~165 MB): random weights of UNet(**MEDFORJ_UNET) as a plain
    safetensors state dict, like the published files. Made once per session."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = ddpm_mini.UNet(**ddpm_mini.MEDFORJ_UNET)
    path = tmp_path_factory.mktemp("standin") / "standin.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
