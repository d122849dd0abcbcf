import Glibc
import CShim

/// Gives the heap's free pages back to the kernel (glibc's malloc_trim).
/// A burst (thousands of connections, a bulk transfer) grows malloc's
/// arenas; when it ends, the freed chunks stay mapped inside them, and
/// glibc returns by itself only the free space at the top of an arena,
/// so most of what thousands of closed connections used stays resident.
///
/// malloc_trim(0) walks every arena's free chunks and unmaps their whole
/// pages (MADV_DONTNEED); live memory is not moved. It holds one arena's
/// lock at a time, so an event loop allocating meanwhile waits that long.
public enum FreeHeap {
    /// Trims and returns (resident anonymous kB before, after, and the
    /// microseconds malloc_trim took).
    @discardableResult
    public static func release() -> (beforeKB: Int, afterKB: Int, micros: Int) {
        let before = residentAnonymousKB()
        var start = timespec(), end = timespec()
        clock_gettime(CLOCK_MONOTONIC, &start)
        _ = pal_malloc_trim()
        clock_gettime(CLOCK_MONOTONIC, &end)
        let micros = (end.tv_sec - start.tv_sec) * 1_000_000 + (end.tv_nsec - start.tv_nsec) / 1000
        return (before, residentAnonymousKB(), micros)
    }

    /// RssAnon of /proc/self/status, in kB (0 if it cannot be read).
    public static func residentAnonymousKB() -> Int {
        guard let status = CodePages.readAll("/proc/self/status") else { return 0 }
        for line in status.split(separator: "\n") where line.hasPrefix("RssAnon:") {
            return line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first.flatMap { Int($0) } ?? 0
        }
        return 0
    }
}
