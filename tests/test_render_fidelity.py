"""apply_legacy_look: textures drawn as MuJoCo <= 3.3.2 drew them, on whichever MuJoCo is installed.

The checks hold on every MuJoCo version. On the project's MuJoCo (3.3.2, no texture colour space)
the function must change nothing; on MuJoCo >= 3.3.3 it must undo the sRGB decoding.
``test_newer_mujoco.py`` runs this file under MuJoCo 3.17.0 to exercise that branch;
``benchmarks/mujoco_render_fidelity.py`` compares whole LIBERO images across versions.
"""

import struct
import zlib

import mujoco
import numpy as np
import pytest

from srpo_rl.envs import LiberoSim
from srpo_rl.envs.render_fidelity import apply_legacy_look, srgb_textures

HAS_COLORSPACE = hasattr(mujoco, "mjtColorSpace")
TEXEL = 128
# The libero_object task 0 scene at init state 0: mean agentview pixel rendered by MuJoCo 2.3.7 to
# 3.3.2 (MuJoCo >= 3.3.3 without the fix gives about 103); images vary by a few pixel levels
# between processes and hard resets, far below the tolerance.
LIBERO_OBJECT_MEAN = 139.46


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _write_png(path, value: int, srgb_chunk: bool, size: int = 8) -> None:
    """A flat grey RGB PNG; with ``srgb_chunk`` it carries the ``sRGB`` chunk that MuJoCo detects."""
    rows = b"".join(b"\x00" + bytes([value] * 3 * size) for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
    png += _chunk(b"sRGB", b"\x00") if srgb_chunk else b""
    png += _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    path.write_bytes(png)


def _model(tmp_path, srgb_chunk: bool) -> mujoco.MjModel:
    """A textured plane filling a top-down camera, lit by emission only: a pixel shows its texel."""
    path = tmp_path / ("srgb.png" if srgb_chunk else "plain.png")
    _write_png(path, TEXEL, srgb_chunk)
    xml = f"""
    <mujoco>
      <visual><headlight active="0"/></visual>
      <asset>
        <texture name="tex" type="2d" file="{path}"/>
        <material name="mat" texture="tex" emission="1" specular="0" shininess="0" reflectance="0"/>
      </asset>
      <worldbody>
        <geom type="plane" size="1 1 0.1" material="mat"/>
        <camera name="top" pos="0 0 1" xyaxes="1 0 0 0 1 0"/>
      </worldbody>
    </mujoco>"""
    return mujoco.MjModel.from_xml_string(xml)


def _render(model: mujoco.MjModel) -> np.ndarray:
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    renderer = mujoco.Renderer(model, 32, 32)
    try:
        renderer.update_scene(data, "top")
        return renderer.render().copy()
    finally:
        renderer.close()


def _srgb_decode(value: int) -> float:
    """The sRGB transfer function (IEC 61966-2-1): what an ``GL_SRGB8`` texture returns, in 0-255."""
    c = value / 255
    return 255 * (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)


@pytest.mark.parametrize("srgb_chunk", [False, True])
def test_texels_render_as_stored_after_the_fix(tmp_path, srgb_chunk):
    model = _model(tmp_path, srgb_chunk)
    tagged = srgb_chunk and HAS_COLORSPACE  # only MuJoCo >= 3.3.3 reads the chunk
    assert srgb_textures(model) == ((0,) if tagged else ())
    # before: the renderer decodes an sRGB-tagged texture (128 -> 55)
    expected_before = _srgb_decode(TEXEL) if tagged else TEXEL
    np.testing.assert_allclose(_render(model).mean(), expected_before, atol=1.0)

    assert apply_legacy_look(model) == ((0,) if tagged else ())
    assert srgb_textures(model) == ()
    if tagged:
        assert model.tex_colorspace[0] == mujoco.mjtColorSpace.mjCOLORSPACE_LINEAR
    # after: every version draws the stored texel, as MuJoCo <= 3.3.2 does
    np.testing.assert_allclose(_render(model).mean(), TEXEL, atol=1.0)
    assert apply_legacy_look(model) == ()  # idempotent


def test_no_op_leaves_the_model_untouched(tmp_path):
    model = _model(tmp_path, srgb_chunk=False)
    before = {name: np.array(getattr(model, name)).copy() for name in ("tex_data", "tex_type", "mat_texid")}
    assert apply_legacy_look(model) == ()
    for name, value in before.items():
        np.testing.assert_array_equal(getattr(model, name), value)


def test_rejects_other_objects():
    with pytest.raises(TypeError, match="pass a mujoco.MjModel"):
        apply_legacy_look("libero_object")


# -- LIBERO ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim():
    sim = LiberoSim("libero_object", task_id=0, num_steps_wait=0, legacy_look=True)
    yield sim
    sim.close()


def _model_of(sim: LiberoSim) -> mujoco.MjModel:
    return sim.env.env.sim.model._model


def test_libero_sim_applies_the_legacy_look(sim):
    assert sim.legacy_look
    assert srgb_textures(_model_of(sim)) == ()
    if not HAS_COLORSPACE:
        assert sim.legacy_look_textures == ()  # nothing to change on MuJoCo <= 3.3.2
    else:
        # the floor tiles and the salad dressing label carry the sRGB chunk
        model = _model_of(sim)
        names = {mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_TEXTURE, i) for i in sim.legacy_look_textures}
        assert "texplane" in names
    sim.reset(0)
    assert abs(sim.render().mean() - LIBERO_OBJECT_MEAN) < 0.5


def test_libero_sim_reapplies_after_a_hard_reset(sim):
    before = sim.legacy_look_textures
    model = _model_of(sim)
    sim.reset(0, hard=True)
    assert _model_of(sim) is not model  # the hard reset recompiled the model
    assert srgb_textures(_model_of(sim)) == ()
    assert sim.legacy_look_textures == before
    assert abs(sim.render().mean() - LIBERO_OBJECT_MEAN) < 0.5


def test_the_batched_env_draws_the_legacy_look_in_its_workers():
    from srpo_rl.envs import LiberoVecEnv

    env = LiberoVecEnv("libero_object", 1, num_steps_wait=0, legacy_look=True)
    try:
        image = env.reset()["observation", "image"][0]
    finally:
        env.close()
    assert abs(image.float().mean().item() - LIBERO_OBJECT_MEAN) < 0.5
