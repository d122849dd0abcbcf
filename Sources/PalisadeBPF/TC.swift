import CShim
import Glibc

/// tc clsact attachment through netlink. A filter outlives the agent, which
/// is what keeps enforcement in place while the agent is down; attaching
/// again at the same handle and priority swaps the program atomically.
public enum TC {
    public enum Hook: Int32, CustomStringConvertible, Sendable {
        case ingress = 0
        case egress = 1
        public var description: String { self == .ingress ? "ingress" : "egress" }
    }

    /// Palisade's filter slot; fixed so a restarted agent replaces its own filter.
    public static let handle: UInt32 = 0x9a1
    public static let priority: UInt32 = 1

    public static func attach(_ program: BPFProgram, ifindex: Int32, hook: Hook) throws {
        try BPFError.check(pal_tc_attach(ifindex, hook.rawValue, program.fd, handle, priority),
                           "tc attach \(program.name)", "ifindex \(ifindex) \(hook)")
    }

    public static func detach(ifindex: Int32, hook: Hook) throws {
        try BPFError.check(pal_tc_detach(ifindex, hook.rawValue, handle, priority),
                           "tc detach", "ifindex \(ifindex) \(hook)")
    }

    /// Kernel id of the program in Palisade's slot, nil if none.
    public static func attachedProgramID(ifindex: Int32, hook: Hook) throws -> UInt32? {
        var id: UInt32 = 0
        try BPFError.check(pal_tc_query(ifindex, hook.rawValue, handle, priority, &id), "tc query", "ifindex \(ifindex) \(hook)")
        return id == 0 ? nil : id
    }

    public static func ifindex(of name: String) throws -> Int32 {
        let index = if_nametoindex(name)
        if index == 0 { throw BPFError("find interface", name, errno: Glibc.errno == 0 ? ENODEV : Glibc.errno) }
        return Int32(index)
    }
}
