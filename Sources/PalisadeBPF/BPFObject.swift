import CLibbpf
import CShim
import Glibc

/// An eBPF ELF object: opened with its maps pinned by name under a bpffs
/// directory (so they are shared with other objects and survive restarts),
/// then loaded into the kernel.
public final class BPFObject {
    let handle: OpaquePointer
    public let path: String
    private var closed = false

    public init(path: String, pinRoot: String?) throws {
        BPFObject.quietOnce
        guard let obj = pal_object_open_file(path, pinRoot) else {
            throw BPFError("open object", path, errno: Glibc.errno)
        }
        handle = obj
        self.path = path
    }

    private static let quietOnce: Void = pal_libbpf_quiet()

    public func load() throws {
        try BPFError.check(bpf_object__load(handle), "load object", path)
    }

    public func program(named name: String) throws -> BPFProgram {
        guard let prog = bpf_object__find_program_by_name(handle, name) else {
            throw BPFError("find program", "\(name) in \(path)", errno: ENOENT)
        }
        return BPFProgram(handle: prog, name: name, owner: self)
    }

    public func map(named name: String) throws -> BPFMap {
        guard let map = bpf_object__find_map_by_name(handle, name) else {
            throw BPFError("find map", "\(name) in \(path)", errno: ENOENT)
        }
        let fd = bpf_map__fd(map)
        try BPFError.check(fd, "map fd", name)
        return try BPFMap(borrowedFD: fd, name: name, owner: self)
    }

    public func close() {
        guard !closed else { return }
        closed = true
        bpf_object__close(handle)
    }

    deinit { close() }
}

/// A program of a loaded object.
public struct BPFProgram {
    let handle: OpaquePointer
    public let name: String
    let owner: BPFObject

    public var fd: Int32 { bpf_program__fd(handle) }

    /// Runs the program once on a crafted packet (BPF_PROG_TEST_RUN; tc and
    /// cgroup_skb programs) and returns its return value: unit tests of the
    /// datapath without namespaces or real traffic.
    public func testRun(packet: [UInt8], mark: UInt32 = 0) throws -> UInt32 {
        var retval: UInt32 = 0
        let err = packet.withUnsafeBytes { pal_prog_test_run_skb(fd, $0.baseAddress, UInt32($0.count), mark, &retval) }
        if err != 0 { throw BPFError("BPF_PROG_TEST_RUN", name, errno: err) }
        return retval
    }

    /// Kernel id of the loaded program (for status and for adoption checks).
    public var id: UInt32 {
        var info = bpf_prog_info()
        var len = UInt32(MemoryLayout<bpf_prog_info>.size)
        return bpf_obj_get_info_by_fd(fd, &info, &len) == 0 ? info.id : 0
    }
}
