"""Native model implementations: OpenVLA-OFT (:mod:`.openvla_oft`) and V-JEPA 2 loading (:mod:`.vjepa2`)."""
