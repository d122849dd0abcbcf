import XCTest
import Foundation
@testable import PalisadeAgent

final class CodePagesTests: XCTestCase {
    static let sample = """
    55d0c0000000-55d0c1000000 r-xp 00000000 08:01 123 /usr/bin/palisade
    Size:              16384 kB
    Rss:                9000 kB
    Anonymous:             0 kB
    VmFlags: rd ex mr mw me
    55d0c1000000-55d0c1100000 r--p 01000000 08:01 123 /usr/bin/palisade
    Rss:                 900 kB
    Anonymous:           900 kB
    55d0c1100000-55d0c1200000 rw-p 01100000 08:01 123 /usr/bin/palisade
    Rss:                 100 kB
    Anonymous:           100 kB
    7f0000000000-7f0000100000 r--p 00000000 08:01 456 /opt/swift/usr/lib/swift/linux/libFoundation.so
    Rss:                 400 kB
    Anonymous:             0 kB
    7f0000100000-7f0000200000 r--s 00000000 08:01 789 /tmp/shared map
    Rss:                  40 kB
    Anonymous:             0 kB
    7f0000200000-7f0000300000 rw-p 00000000 00:00 0
    Rss:                2000 kB
    Anonymous:          2000 kB
    7ffc00000000-7ffc00002000 r-xp 00000000 00:00 0                          [vdso]
    Rss:                   8 kB
    Anonymous:             0 kB
    """

    func testOnlyCleanPrivateFileMappingsAreReleasable() {
        let maps = CodePages.mappings(smaps: Self.sample)
        XCTAssertEqual(maps.count, 7)
        XCTAssertEqual(maps[0], CodePages.Mapping(start: 0x55d0c0000000, end: 0x55d0c1000000, permissions: "r-xp", path: "/usr/bin/palisade", anonymousKB: 0, rssKB: 9000))
        XCTAssertEqual(maps[4].path, "/tmp/shared map")
        // Code and read-only data of a file: yes. A RELRO segment (copied
        // on write, then made read-only), writable data, a shared mapping,
        // anonymous memory and the vDSO: never.
        XCTAssertEqual(maps.map(\.isReleasable), [true, false, false, true, false, false, false])
    }

    /// In this very process: the released mappings' resident pages fall,
    /// every mapping holding the process's own (anonymous) pages keeps
    /// them, and code that was released still runs (faulted back in).
    func testReleaseDropsCodePagesAndKeepsWrittenOnes() throws {
        let before = CodePages.mappings(smaps: try XCTUnwrap(CodePages.readAll("/proc/self/smaps")))
        let releasableBefore = before.filter(\.isReleasable).reduce(0) { $0 + $1.rssKB }
        XCTAssertGreaterThan(releasableBefore, 1000, "a Swift test process has megabytes of code resident")
        let released = CodePages.release()
        XCTAssertGreaterThan(released, 1000)
        let after = CodePages.mappings(smaps: try XCTUnwrap(CodePages.readAll("/proc/self/smaps")))
        let releasableAfter = after.filter { m in before.contains { $0.start == m.start && $0.isReleasable } }.reduce(0) { $0 + $1.rssKB }
        XCTAssertLessThan(releasableAfter, releasableBefore / 2, "before \(releasableBefore) kB, after \(releasableAfter) kB")
        for m in before where m.anonymousKB > 0 && m.path.hasPrefix("/") {
            let now = try XCTUnwrap(after.first { $0.start == m.start }, m.path)
            XCTAssertGreaterThanOrEqual(now.anonymousKB, m.anonymousKB, "\(m.path) \(m.permissions) kept its written pages")
        }
        // Foundation, the Swift runtime and this binary's code run again.
        let text = try JSONEncoder().encode(["released": released])
        XCTAssertEqual(try JSONDecoder().decode([String: Int].self, from: text), ["released": released])
    }
}
