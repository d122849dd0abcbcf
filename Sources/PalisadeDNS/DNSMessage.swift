import CResolv
import PalisadePolicy

/// The parts of a DNS message the proxy acts on, read with glibc's parser
/// (libresolv's ns_initparse/ns_parserr): the question, the answer
/// section's A, AAAA and CNAME records, the response code.
public struct DNSMessage: Sendable, Equatable {
    public struct Record: Sendable, Equatable {
        public enum Data: Sendable, Equatable {
            case address(IPAddress)
            case cname(String)
        }
        public var name: String
        public var ttl: UInt32
        public var data: Data
    }

    public var id: UInt16
    public var isResponse: Bool
    public var rcode: Int
    public var questionName: String
    public var questionType: UInt16
    public var answers: [Record]

    public static let typeA: UInt16 = 1, typeAAAA: UInt16 = 28, typeCNAME: UInt16 = 5
    public static let rcodeServFail = 2, rcodeRefused = 5

    public struct ParseError: Error, CustomStringConvertible {
        public var description: String
    }

    /// Parses a message; one without exactly one question is an error.
    public init(_ bytes: [UInt8]) throws {
        var msg = ns_msg()
        let parsed: Self? = bytes.withUnsafeBufferPointer { buf -> Self? in
            guard let base = buf.baseAddress, ns_initparse(base, Int32(buf.count), &msg) == 0 else { return nil }
            guard pal_ns_msg_count(&msg, ns_s_qd) == 1 else { return nil }
            var rr = ns_rr()
            guard ns_parserr(&msg, ns_s_qd, 0, &rr) == 0 else { return nil }
            let qname = DNSMessage.name(of: &rr)
            var answers: [Record] = []
            for i in 0..<Int32(pal_ns_msg_count(&msg, ns_s_an)) {
                guard ns_parserr(&msg, ns_s_an, i, &rr) == 0 else { return nil }
                let name = DNSMessage.name(of: &rr)
                guard rr.rr_class == 1 /* IN */ else { continue }
                switch rr.type {
                case DNSMessage.typeA where rr.rdlength == 4:
                    let b = UnsafeBufferPointer(start: rr.rdata, count: 4)
                    answers.append(Record(name: name, ttl: rr.ttl, data: .address(.v4(b[0], b[1], b[2], b[3]))))
                case DNSMessage.typeAAAA where rr.rdlength == 16:
                    answers.append(Record(name: name, ttl: rr.ttl, data: .address(IPAddress(bytes16: Array(UnsafeBufferPointer(start: rr.rdata, count: 16))))))
                case DNSMessage.typeCNAME:
                    var target = [CChar](repeating: 0, count: Int(NS_MAXDNAME))
                    guard ns_name_uncompress(pal_ns_msg_base(&msg), pal_ns_msg_end(&msg), rr.rdata, &target, target.count) >= 0 else { return nil }
                    answers.append(Record(name: name, ttl: rr.ttl, data: .cname(FQDNSelector.normalize(String(decoding: target.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)))))
                default:
                    continue
                }
            }
            return DNSMessage(id: pal_ns_msg_id(&msg), isResponse: ns_msg_getflag(msg, Int32(ns_f_qr.rawValue)) != 0,
                              rcode: Int(ns_msg_getflag(msg, Int32(ns_f_rcode.rawValue))), questionName: qname,
                              questionType: DNSMessage.questionType(bytes), answers: answers)
        }
        guard let parsed else { throw ParseError(description: "not a DNS message with one question") }
        self = parsed
    }

    init(id: UInt16, isResponse: Bool, rcode: Int, questionName: String, questionType: UInt16, answers: [Record]) {
        self.id = id; self.isResponse = isResponse; self.rcode = rcode
        self.questionName = questionName; self.questionType = questionType; self.answers = answers
    }

    static func name(of rr: inout ns_rr) -> String {
        withUnsafeBytes(of: &rr.name) { raw in
            FQDNSelector.normalize(String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self))
        }
    }

    /// QTYPE: the two bytes after the question's name.
    static func questionType(_ bytes: [UInt8]) -> UInt16 {
        let end = bytes.withUnsafeBufferPointer { pal_ns_question_end($0.baseAddress, Int32($0.count)) }
        guard end >= 16 else { return 0 }
        return UInt16(bytes[Int(end) - 4]) << 8 | UInt16(bytes[Int(end) - 3])
    }

    /// The addresses the answer gives for its question, following CNAMEs
    /// from the question's name, with every name on the way (a policy on
    /// the first name or on an alias both match), and the smallest TTL
    /// along the chain for each address.
    public func resolvedAddresses() -> (names: Set<String>, addresses: [(IPAddress, UInt32)]) {
        var names: Set<String> = [questionName]
        var current = questionName
        var chainTTL = UInt32.max
        // A chain longer than the answer itself is a loop.
        for _ in 0...answers.count {
            guard let next = answers.first(where: { $0.name == current && { if case .cname = $0.data { return true }; return false }($0) }),
                  case .cname(let target) = next.data, names.insert(target).inserted else { break }
            chainTTL = min(chainTTL, next.ttl)
            current = target
        }
        var addresses: [(IPAddress, UInt32)] = []
        for r in answers where names.contains(r.name) {
            if case .address(let a) = r.data { addresses.append((a, min(r.ttl, chainTTL))) }
        }
        return (names, addresses)
    }

    /// An answer to `query` with no records and this response code
    /// (REFUSED for a name the workload may not resolve, SERVFAIL when the
    /// resolver cannot be reached): the query's header and question, with
    /// QR set. nil if the query is malformed.
    public static func reply(to query: [UInt8], rcode: Int) -> [UInt8]? {
        let end = query.withUnsafeBufferPointer { pal_ns_question_end($0.baseAddress, Int32($0.count)) }
        guard end > 0 else { return nil }
        var out = Array(query[0..<Int(end)])
        out[2] = (out[2] | 0x80) & ~0x04 & ~0x02   // QR; not authoritative, not truncated
        out[3] = (out[3] & 0x70) | 0x80 | UInt8(rcode & 0x0f)   // RA, keep Z/AD/CD, set RCODE
        for i in 6..<12 { out[i] = 0 }   // no answer, authority or additional records
        return out
    }
}
