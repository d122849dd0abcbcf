import XCTest
@testable import PalisadeAgent

final class FreeHeapTests: XCTestCase {
    /// Memory freed in the middle of the heap (live blocks on both sides,
    /// so glibc cannot return it by itself) goes back to the kernel; the
    /// blocks still in use keep their contents.
    func testFreedMiddleOfTheHeapIsReturnedAndLiveBlocksKeepTheirBytes() throws {
        let count = 16_000, size = 4096
        var blocks = (0..<count).map { i -> UnsafeMutableRawPointer in
            let p = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
            p.initializeMemory(as: UInt8.self, repeating: UInt8(truncatingIfNeeded: i), count: size)
            return p
        }
        // Keep one block in 100: ~62 MB freed between live blocks.
        var kept: [(Int, UnsafeMutableRawPointer)] = []
        for (i, p) in blocks.enumerated() {
            if i % 100 == 0 { kept.append((i, p)) } else { p.deallocate() }
        }
        blocks.removeAll()
        let r = FreeHeap.release()
        XCTAssertGreaterThan(r.beforeKB - r.afterKB, 32_000, "resident anonymous memory \(r.beforeKB) -> \(r.afterKB) kB")
        for (i, p) in kept {
            let bytes = UnsafeRawBufferPointer(start: p, count: size)
            XCTAssertTrue(bytes.allSatisfy { $0 == UInt8(truncatingIfNeeded: i) }, "block \(i) changed")
            p.deallocate()
        }
    }
}
