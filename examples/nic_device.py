"""A toy network card: a driver maps receive and transmit buffers, a device model moves
packets through the IOVAs it was given, and a driver bug shows up as an IOMMU fault.

Run: python examples/nic_device.py
"""

from __future__ import annotations

import scatterlist as sg
from scatterlist import DataDirection as Dir


class NicModel:
    """The device side: it only ever sees DMA addresses."""

    def __init__(self, device: sg.Device) -> None:
        self.device = device

    def receive(self, rx_segments: "list[tuple[int, int]]", packet: bytes) -> int:
        """Write an incoming packet into the receive buffer, segment by segment."""
        done = 0
        for address, length in rx_segments:
            piece = packet[done : done + length]
            if not piece:
                break
            self.device.dma_write(address, piece)
            done += len(piece)
        return done

    def transmit(self, tx_segments: "list[tuple[int, int]]", n_bytes: int) -> bytes:
        """Read an outgoing packet from the transmit buffer."""
        out = bytearray()
        for address, length in tx_segments:
            take = min(length, n_bytes - len(out))
            out += self.device.dma_read(address, take)
            if len(out) == n_bytes:
                break
        return bytes(out)


def main() -> None:
    mem = sg.PhysicalMemory(1 << 30)
    iommu = sg.Iommu(mem)
    dev = sg.Device(mem, iommu=iommu, name="nic0", debug="raise")
    nic = NicModel(dev)

    # The driver: a 9000-byte receive buffer from scattered pages, mapped device-writable.
    rx = sg.SGTable.new(dev, mem.vmalloc(9000), Dir.FROM_DEVICE)
    rx_segments = [(s.dma_address, s.dma_len) for s in rx]
    print(f"rx: {rx.orig_nents} CPU entries -> {rx.nents} DMA segment(s) {rx_segments}")

    packet = bytes(range(256)) * 20  # 5120 bytes
    received = nic.receive(rx_segments, packet)
    rx.sync_for_cpu()
    cpu_view = rx.copy_to_buffer(received)
    assert cpu_view == packet[:received]
    print(f"device wrote {received} bytes; the CPU reads them back intact")

    # Transmit: the driver copies a frame into pages and maps them device-readable.
    tx_pages = mem.alloc_pages(2, "scattered")
    frame = b"GET / HTTP/1.1\r\n\r\n" * 100
    tx = sg.SGTable.new(dev, tx_pages, Dir.TO_DEVICE)
    tx.copy_from_buffer(frame)
    assert nic.transmit([(s.dma_address, s.dma_len) for s in tx], len(frame)) == frame
    print(f"device read a {len(frame)}-byte frame")

    # A driver bug: the device is told to write into the transmit buffer.
    try:
        nic.receive([(s.dma_address, s.dma_len) for s in tx], b"oops")
    except sg.IommuFault as fault:
        print(f"bug caught: {fault} (logged: {iommu.faults()[-1]})")

    # Unbind: Devres unmaps both buffers; the device faults if it tries again.
    dev.unbind()
    try:
        nic.transmit(rx_segments, 1)
    except sg.IommuFault as fault:
        print(f"after unbind: {fault.fault_reason}")
    rx.close()
    tx.close()


if __name__ == "__main__":
    main()
