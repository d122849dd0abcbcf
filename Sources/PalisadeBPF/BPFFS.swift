import CShim
import Foundation
import Glibc

/// bpffs and cgroup2 discovery, and namespace entry.
public enum BPFFS {
    /// Mount points of a filesystem type, from /proc/mounts.
    public static func mountPoints(ofType type: String) -> [String] {
        guard let text = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ")
            return f.count > 2 && f[2] == type ? String(f[1]) : nil
        }
    }

    /// Makes sure a bpffs is mounted at or above dir's parent, mounting one at
    /// /sys/fs/bpf if none is, and creates dir.
    public static func ensure(directory dir: String) throws {
        let mounts = mountPoints(ofType: "bpf")
        if !mounts.contains(where: { dir == $0 || dir.hasPrefix($0 + "/") }) {
            try? FileManager.default.createDirectory(atPath: "/sys/fs/bpf", withIntermediateDirectories: true)
            if mount("bpf", "/sys/fs/bpf", "bpf", 0, nil) != 0 {
                throw BPFError("mount bpffs", "/sys/fs/bpf", errno: Glibc.errno)
            }
        }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
    }

    /// The cgroup v2 mount (hybrid hosts put it at /sys/fs/cgroup/unified).
    public static func cgroup2Mount() -> String? {
        mountPoints(ofType: "cgroup2").first
    }

    /// Enters the network namespace at path, on the calling thread only.
    public static func enterNetworkNamespace(_ path: String) throws {
        try BPFError.check(pal_setns_net(path), "enter network namespace", path)
    }
}
