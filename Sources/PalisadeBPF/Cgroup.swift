import CLibbpf
import Glibc

/// cgroup attachment through a bpf_link pinned in bpffs: the link, and so the
/// enforcement, survives the agent; a restarted agent swaps the program in
/// the pinned link atomically instead of detaching.
public enum CgroupAttach {
    /// Attaches (or re-points the pinned link at `linkPin` to) the program.
    public static func attach(_ program: BPFProgram, cgroupPath: String, linkPin: String) throws {
        if access(linkPin, F_OK) == 0, let existing = bpf_link__open(linkPin), libbpf_get_error(UnsafeRawPointer(existing)) == 0 {
            defer { bpf_link__disconnect(existing); bpf_link__destroy(existing) }
            try BPFError.check(bpf_link__update_program(existing, program.handle), "update cgroup link", linkPin)
            return
        }
        let cg = open(cgroupPath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if cg < 0 { throw BPFError("open cgroup", cgroupPath, errno: Glibc.errno) }
        defer { close(cg) }
        guard let link = bpf_program__attach_cgroup(program.handle, cg), libbpf_get_error(UnsafeRawPointer(link)) == 0 else {
            throw BPFError("attach \(program.name) to cgroup", cgroupPath, errno: Glibc.errno)
        }
        // Keep the attachment after this process exits: pin, then let go of our reference.
        let rc = bpf_link__pin(link, linkPin)
        if rc != 0 {
            bpf_link__destroy(link)
            throw BPFError("pin cgroup link", linkPin, errno: rc)
        }
        bpf_link__disconnect(link)
        bpf_link__destroy(link)
    }

    /// Removes the pinned link, which detaches the program.
    public static func detach(linkPin: String) throws {
        if unlink(linkPin) != 0 && Glibc.errno != ENOENT {
            throw BPFError("remove cgroup link", linkPin, errno: Glibc.errno)
        }
    }

    /// The cgroup v2 id (the inode number of its directory).
    public static func id(ofCgroup path: String) throws -> UInt64 {
        var st = stat()
        if stat(path, &st) != 0 { throw BPFError("stat cgroup", path, errno: Glibc.errno) }
        return UInt64(st.st_ino)
    }
}
