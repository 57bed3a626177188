"""Keys and cryptographic protection: key sets, the Ed25519 seal, PS3.15 signatures, AES-256-GCM
encryption and the reversible watermark's encrypted residual. Every primitive is from
``cryptography``.

Layer: runtime. Imports ``io`` and ``errors``.
"""
