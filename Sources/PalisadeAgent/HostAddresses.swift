import Foundation
import Glibc
import PalisadePolicy

/// The node's own addresses (getifaddrs in the agent's network namespace).
public enum HostAddresses {
    /// All addresses, or those of one interface.
    public static func discover(interface: String? = nil) -> [IPAddress] {
        var head: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&head) == 0 else { return [] }
        defer { freeifaddrs(head) }
        var out = Set<IPAddress>()
        var p = head
        while let ifa = p {
            defer { p = ifa.pointee.ifa_next }
            guard let sa = ifa.pointee.ifa_addr else { continue }
            if let interface, String(cString: ifa.pointee.ifa_name) != interface { continue }
            switch Int32(sa.pointee.sa_family) {
            case AF_INET:
                let a = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr.s_addr }
                let b = withUnsafeBytes(of: a) { Array($0) }
                out.insert(.v4(b[0], b[1], b[2], b[3]))
            case AF_INET6:
                let b = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { s in withUnsafeBytes(of: s.pointee.sin6_addr) { Array($0) } }
                if b[0] == 0xfe && (b[1] & 0xc0) == 0x80 { continue } // link-local: not routable identity
                out.insert(IPAddress(bytes16: b))
            default: continue
            }
        }
        return out.sorted()
    }
}
