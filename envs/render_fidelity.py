"""Render LIBERO on MuJoCo >= 3.3.3 as MuJoCo <= 3.3.2 did (the look of the LIBERO training data).

MuJoCo 3.3.3 gave textures a colour space (``mjModel.tex_colorspace``, MJCF
``texture/colorspace``: ``auto``, ``linear`` or ``sRGB``). With the default ``auto`` the compiler
marks a PNG texture as sRGB when its file carries an ``sRGB`` chunk, and the OpenGL renderer then
stores it as a ``GL_SRGB8`` texture, which OpenGL decodes to linear values before lighting. The
framebuffer is not sRGB, so nothing re-encodes the result: those textures come out darker (a
texel of 128 is drawn as 55). Up to 3.3.2 every texture byte was used as it is.

LIBERO's XML sets no colour space, and 4 of its 170 PNG assets carry the chunk: the two floor
tiles and the two salad dressing labels (``gAMA``/``cHRM`` chunks alone leave a texture linear).
With MuJoCo >= 3.3.3 the libero_object scene, whose objects stand on the floor, drops from a mean
agentview pixel of 139.5 to 102.9. :func:`apply_legacy_look` marks those textures linear again
after compilation and re-uploads them to the renderer. The images are then bit-identical to
MuJoCo 3.3.2's on MuJoCo 3.3.3 to 3.10 (3.11: a few pixels off by one). From 3.12 on, 2D
textures on box geoms are mapped differently, a renderer change this does not undo: about 50 dB
PSNR remains on scenes with such boxes (the wall, the stove). ``benchmarks/mujoco_render_fidelity.py``
measures both. On MuJoCo <= 3.3.2 the call does nothing.

Examples:
    >>> import mujoco
    >>> from srpo_rl.envs.render_fidelity import apply_legacy_look
    >>> model = mujoco.MjModel.from_xml_string("<mujoco/>")
    >>> apply_legacy_look(model)  # no textures: nothing to change
    ()
"""

from __future__ import annotations

from typing import Any

import mujoco

__all__ = ["apply_legacy_look", "srgb_textures"]

# mjtColorSpace appeared with MuJoCo 3.3.3; earlier versions have no texture colour space at all
_COLORSPACE = getattr(mujoco, "mjtColorSpace", None)


def srgb_textures(model: mujoco.MjModel) -> tuple[int, ...]:
    """Ids of the textures that ``model`` renders as sRGB (always empty on MuJoCo <= 3.3.2)."""
    if _COLORSPACE is None or not hasattr(model, "tex_colorspace"):
        return ()
    srgb = int(_COLORSPACE.mjCOLORSPACE_SRGB)
    return tuple(i for i in range(model.ntex) if int(model.tex_colorspace[i]) == srgb)


def _model_and_contexts(target) -> tuple[mujoco.MjModel, list]:
    """The compiled model of ``target`` and the robosuite render contexts that hold its textures."""
    if isinstance(target, mujoco.MjModel):
        return target, []
    model = getattr(getattr(target, "model", None), "_model", None)
    if isinstance(model, mujoco.MjModel):  # a robosuite MjSim
        context = getattr(target, "_render_context_offscreen", None)
        return model, [context] if context is not None else []
    raise TypeError(
        f"cannot apply the legacy look to {type(target).__name__!r}; pass a mujoco.MjModel "
        "(before making its renderer) or a robosuite MjSim (env.sim)"
    )


def apply_legacy_look(sim_or_model: Any) -> tuple[int, ...]:
    """Makes MuJoCo >= 3.3.3 draw every texture as MuJoCo <= 3.3.2 did: sRGB textures become linear.

    Args:
        sim_or_model: a ``mujoco.MjModel`` (call this before creating its renderer, which uploads
            the textures), or a robosuite ``MjSim``, whose existing offscreen render context gets
            the changed textures re-uploaded.

    Returns:
        The ids of the textures changed; empty on MuJoCo <= 3.3.2 and for models without sRGB
        textures, where the call changes nothing. A hard reset in robosuite recompiles the model
        from its XML, so apply it again after one.
    """
    model, contexts = _model_and_contexts(sim_or_model)
    changed = srgb_textures(model)
    if not changed:
        return ()
    linear = int(_COLORSPACE.mjCOLORSPACE_LINEAR)
    for texid in changed:
        model.tex_colorspace[texid] = linear
    for context in contexts:
        # robosuite's own upload_texture passes its model wrapper, which mujoco rejects
        context.gl_ctx.make_current()
        for texid in changed:
            mujoco.mjr_uploadTexture(model, context.con, texid)
    return changed
