"""Engines that run graphlrp's offline work (`explain`, `evaluate`) somewhere other than this process.

`ray` puts it on a Ray cluster (or a Ray started on this machine). It is imported only when a command is given
`--ray`, so Ray stays an optional dependency (`pip install graphlrp[ray]`).
"""
