import Foundation
import Glibc

/// The agent's file descriptors: every connection it accepts or opens holds
/// one, so the limit is raised at start and the use is reported (status,
/// /metrics) before it runs out.
enum FileDescriptors {
    /// Raises the soft RLIMIT_NOFILE to the hard limit; returns the limit in force.
    @discardableResult
    static func raiseLimit() -> Int {
        var lim = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &lim) == 0 else { return 0 }
        if lim.rlim_cur < lim.rlim_max {
            var raised = lim
            raised.rlim_cur = lim.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { lim = raised }
        }
        return lim.rlim_cur >= rlim_t(Int.max) ? Int.max : Int(lim.rlim_cur)
    }

    static var limit: Int {
        var lim = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &lim) == 0 else { return 0 }
        return lim.rlim_cur >= rlim_t(Int.max) ? Int.max : Int(lim.rlim_cur)
    }

    /// Descriptors open now (entries of /proc/self/fd, less the one reading it).
    static var inUse: Int {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 1) - 1
    }
}
