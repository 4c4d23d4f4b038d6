"""Deployment tests: release tarballs installed offline in emulated Raspberry Pi OS-like roots."""
