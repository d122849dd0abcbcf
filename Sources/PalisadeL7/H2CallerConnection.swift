import NIOCore
import NIOHPACK
import NIOHTTP2

/// The caller's side of the HTTP/2 relay: the server end of the caller's
/// connection, framed here instead of by NIO's HTTP/2 handler.
///
/// Why: under h2load NIO's handler on this side (its stream state machine,
/// frame objects, its own flow-control buffers, and a second HPACK pass
/// through them) was ~35% of the proxy's samples, where all the relay
/// needs is each stream's decoded head and its bytes. This side faces
/// whoever reaches the port, so it does, per RFC 9113 and RFC 7541, what
/// NIO's handler did and h2spec checks (146 cases, tools/testing/
/// h2-conformance):
///
/// - the client preface, then SETTINGS first; every frame's size, stream
///   and state rules (idle, open, half-closed, closed; streams the agent
///   reset have their late frames ignored, others closed get
///   STREAM_CLOSED); padding; PRIORITY's self-dependency; CONTINUATION
///   sequencing;
/// - HPACK through NIO's decoder (table size 4,096, header lists up to
///   64 KiB) and encoder (to the caller's HEADER_TABLE_SIZE); every
///   header block is decoded, refused streams' too, so the table stays in
///   step;
/// - request heads and trailers by `H2Fields` (malformed: PROTOCOL_ERROR
///   on that stream), content-length against the DATA received;
/// - both flow-control directions: request DATA past a window is an error,
///   response DATA waits here for the caller's windows and the workload's
///   window comes back only once it is written, so neither side can make
///   the agent hold more than the windows it granted;
/// - the flood limits NIO had (and the WINDOW_UPDATE one of H2CallerGuard),
///   each ending the connection with GOAWAY ENHANCE_YOUR_CALM: 200
///   RST_STREAM in 30 s (rapid reset), 200 stream errors, 16 empty DATA
///   frames in a row, 10,000 control answers while the caller does not
///   read, 256 frames or 128 KiB in one header block, more WINDOW_UPDATEs
///   than the data sent explains; 256 concurrent streams (REFUSED_STREAM
///   past it).
///
/// A connection error sends GOAWAY and closes (RFC 9113 §5.4.1); the
/// workload's connection closes with it.
final class H2CallerConnection: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    typealias Flag = H2Wire.Flag
    typealias Failure = H2Wire.ConnectionError

    static let maxConcurrentStreams = 256
    static let maxResets = 200
    static let resetWindow = TimeAmount.seconds(30)
    static let maxGlitches = 200
    static let maxEmptyDataFrames = 16
    static let maxControlAnswersUnread = 10_000
    static let maxHeaderFrames = 256
    /// WINDOW_UPDATE frames allowed beyond two per DATA frame sent and one
    /// per stream opened.
    static let windowUpdateSlack = 1000

    private enum Outgoing {
        case headers(HPACKHeaders, endStream: Bool)
        /// `source`: the workload's stream whose window gets `credit` back once written.
        case data(ByteBuffer, endStream: Bool, source: HTTP2StreamID?, credit: Int)
    }

    private struct Stream {
        var receiveWindow = H2Relay.streamWindow
        var sendWindow: Int
        var remoteEnded = false
        var localEnded = false
        /// Request body bytes still due by its content-length.
        var contentLeft: Int?
        var queue: [Outgoing] = []
    }

    private let relay: H2Relay
    private var context: ChannelHandlerContext?
    private var reader = H2FrameReader(maxFrameSize: H2Relay.maxFrameSize)
    private var writer: H2FrameWriter
    private var decoder = HPACKDecoder(allocator: H2Relay.allocator, maxDynamicTableSize: HPACKEncoder.defaultDynamicTableSize,
                                       maxHeaderListSize: H2Relay.maxHeaderListSize)
    private var streams: [Int32: Stream] = [:]
    /// The highest stream the caller opened: any above is idle.
    private var lastStream: Int32 = 0
    private var prefaceLeft = L7ProtocolSniffer.preface.count
    private var sawSettings = false
    private var peerInitialWindow = 65_535
    private var peerMaxFrameSize = 1 << 14
    private var sendWindow = 65_535
    private var receiveWindow = H2Relay.connectionWindow
    private var continuation: (stream: Int32, endStream: Bool, dependency: Int32?, block: ByteBuffer, frames: Int)?
    private var callerWentAway = false
    private var failed = false
    private var unflushed = false

    // Flood accounting.
    private var resets = 0
    private var resetsSince = NIODeadline.uptimeNanoseconds(0)
    private var glitches = 0
    private var emptyDataRun = 0
    private var controlAnswersUnread = 0
    private var unearnedWindowUpdates = 0

    /// Streams the agent reset: their late frames are ignored.
    private var resetHere = RecentStreams()
    /// Streams that were open once: a HEADERS on one is STREAM_CLOSED, on
    /// any other below `lastStream` PROTOCOL_ERROR (RFC 9113 §5.1.1).
    private var openedOnce = RecentStreams()

    init(relay: H2Relay, allocator: ByteBufferAllocator) {
        self.relay = relay
        writer = H2FrameWriter(allocator: allocator)
    }

    var eventLoop: EventLoop? { context?.eventLoop }

    // MARK: the relay's responses

    /// A response head or trailers. The relay has checked them (H2Fields).
    func sendHeaders(_ id: HTTP2StreamID, _ headers: HPACKHeaders, endStream: Bool) {
        enqueue(Int32(id), .headers(headers, endStream: endStream))
    }

    /// Response body bytes, written as far as the caller's windows allow;
    /// the relay's `responseDataTaken` gives the workload's `source`
    /// stream its window back once they are written (or dropped).
    func sendData(_ id: HTTP2StreamID, _ data: ByteBuffer, endStream: Bool, source: HTTP2StreamID?, credit: Int) {
        enqueue(Int32(id), .data(data, endStream: endStream, source: source, credit: credit))
    }

    /// The relay ends a stream (a refused request, the workload's reset).
    func reset(_ id: HTTP2StreamID, _ code: HTTP2ErrorCode) {
        let key = Int32(id)
        guard !failed, context != nil else { return }
        writer.rstStream(key, code)
        rememberReset(key)
        close(key, reason: code)
    }

    /// Gives the caller `n` bytes of window (the connection's, and the
    /// stream's when one is named and still sending).
    func windowUpdate(stream: HTTP2StreamID?, _ n: Int) {
        guard !failed, context != nil else { return }
        if let stream {
            let key = Int32(stream)
            guard let s = streams[key], !s.remoteEnded else { return }
            streams[key]!.receiveWindow += n
            writer.windowUpdate(key, n)
        } else {
            receiveWindow += n
            writer.windowUpdate(0, n)
        }
    }

    func flush() {
        guard let context else { return }
        emit()
        if unflushed {
            unflushed = false
            context.flush()
        }
        if context.channel.isWritable { controlAnswersUnread = 0 }
    }

    // MARK: the channel

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        relay.down = self
        // Our SETTINGS (the server's preface) and a connection window
        // larger than HTTP/2's initial 64 KiB.
        let settings: [(UInt16, Int)] = [(2, 0), (3, Self.maxConcurrentStreams), (4, H2Relay.streamWindow),
                                         (5, H2Relay.maxFrameSize), (6, H2Relay.maxHeaderListSize)]
        writer.frame(.settings, 0, 0) { b in
            for (id, value) in settings {
                b.writeInteger(id)
                b.writeInteger(UInt32(value))
            }
        }
        writer.windowUpdate(0, H2Relay.connectionWindow - 65_535)
        flush()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        reader.append(unwrapInboundIn(data), allocator: context.channel.allocator)
        do {
            if prefaceLeft > 0 { try readPreface() }
            while !failed, prefaceLeft == 0, let f = try reader.next() {
                try frame(f)
            }
        } catch let f as Failure {
            fail(f.code)
        } catch {
            fail(.internalError)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        relay.answerDenials()
        relay.up?.flush()
        flush()
        context.fireChannelReadComplete()
    }

    func channelInactive(context: ChannelHandlerContext) {
        detach()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) { detach() }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    private func detach() {
        if relay.down === self { relay.down = nil }
        context = nil
        streams.removeAll()
        continuation = nil
        reader.reset()
    }

    /// The client preface, compared as it arrives: a wrong byte is an
    /// error at once, not after 24 bytes.
    private func readPreface() throws {
        let expected = L7ProtocolSniffer.preface
        guard var got = reader.take(upTo: prefaceLeft) else { return }
        var offset = expected.count - prefaceLeft
        while let b = got.readInteger(as: UInt8.self) {
            guard b == expected[offset] else { throw Failure(code: .protocolError) }
            offset += 1
        }
        prefaceLeft = expected.count - offset
    }

    // MARK: frames from the caller

    private func frame(_ f: H2FrameReader.Frame) throws {
        if let c = continuation {
            guard f.type == H2Wire.FrameType.continuation.rawValue, f.stream == c.stream else { throw Failure(code: .protocolError) }
            var block = c.block
            var p = f.payload
            guard block.readableBytes + p.readableBytes <= H2Wire.maxHeaderBlock, c.frames < Self.maxHeaderFrames else {
                throw Failure(code: .enhanceYourCalm)
            }
            block.writeBuffer(&p)
            if f.flags & Flag.endHeaders != 0 {
                continuation = nil
                try headers(c.stream, block, endStream: c.endStream, dependency: c.dependency)
            } else {
                continuation = (c.stream, c.endStream, c.dependency, block, c.frames + 1)
            }
            return
        }
        guard let type = H2Wire.FrameType(rawValue: f.type) else { return }   // unknown types are ignored
        guard sawSettings || (type == .settings && f.flags & Flag.ack == 0) else { throw Failure(code: .protocolError) }
        switch type {
        case .data:
            try data(f.flags, f.stream, f.payload)
        case .headers:
            guard f.stream != 0, f.stream & 1 == 1 else { throw Failure(code: .protocolError) }
            var p = try H2Wire.unpadded(f.flags, f.payload)
            var dependency: Int32?
            if f.flags & Flag.priority != 0 {
                guard let d = p.readInteger(as: UInt32.self), p.readInteger(as: UInt8.self) != nil else {
                    throw Failure(code: .frameSizeError)
                }
                dependency = Int32(bitPattern: d & 0x7FFF_FFFF)
            }
            if f.flags & Flag.endHeaders != 0 {
                try headers(f.stream, p, endStream: f.flags & Flag.endStream != 0, dependency: dependency)
            } else {
                var block = H2Relay.allocator.buffer(capacity: p.readableBytes * 2)
                block.writeBuffer(&p)
                continuation = (f.stream, f.flags & Flag.endStream != 0, dependency, block, 1)
            }
        case .priority:
            guard f.stream != 0 else { throw Failure(code: .protocolError) }
            guard f.payload.readableBytes == 5 else { return streamError(f.stream, .frameSizeError) }
            let d = Int32(bitPattern: f.payload.getInteger(at: f.payload.readerIndex, as: UInt32.self)! & 0x7FFF_FFFF)
            if d == f.stream { streamError(f.stream, .protocolError) }
        case .rstStream:
            guard f.stream != 0, f.stream <= lastStream else { throw Failure(code: .protocolError) }
            guard f.payload.readableBytes == 4 else { throw Failure(code: .frameSizeError) }
            try countReset()
            guard streams[f.stream] != nil else { return }
            let code = HTTP2ErrorCode(networkCode: Int(f.payload.getInteger(at: f.payload.readerIndex, as: UInt32.self)!))
            close(f.stream, reason: code)
        case .settings:
            guard f.stream == 0 else { throw Failure(code: .protocolError) }
            if f.flags & Flag.ack != 0 {
                guard f.payload.readableBytes == 0 else { throw Failure(code: .frameSizeError) }
                return
            }
            guard f.payload.readableBytes % 6 == 0 else { throw Failure(code: .frameSizeError) }
            try settings(f.payload)
            sawSettings = true
            writer.frame(.settings, Flag.ack, 0) { _ in }
            try answered()
        case .pushPromise:
            throw Failure(code: .protocolError)   // a client never pushes
        case .ping:
            guard f.stream == 0 else { throw Failure(code: .protocolError) }
            guard f.payload.readableBytes == 8 else { throw Failure(code: .frameSizeError) }
            if f.flags & Flag.ack == 0 {
                var p = f.payload
                writer.frame(.ping, Flag.ack, 0) { $0.writeBuffer(&p) }
                try answered()
            }
        case .goAway:
            guard f.stream == 0 else { throw Failure(code: .protocolError) }
            guard f.payload.readableBytes >= 8 else { throw Failure(code: .frameSizeError) }
            callerWentAway = true
        case .windowUpdate:
            guard f.payload.readableBytes == 4 else { throw Failure(code: .frameSizeError) }
            let n = Int(f.payload.getInteger(at: f.payload.readerIndex, as: UInt32.self)! & 0x7FFF_FFFF)
            unearnedWindowUpdates += 1
            guard unearnedWindowUpdates <= Self.windowUpdateSlack else { throw Failure(code: .enhanceYourCalm) }
            try windowUpdate(from: f.stream, n)
        case .continuation:
            throw Failure(code: .protocolError)   // none expected
        }
    }

    private func data(_ flags: UInt8, _ stream: Int32, _ payload: ByteBuffer) throws {
        guard stream != 0, stream <= lastStream else { throw Failure(code: .protocolError) }
        let flowLength = payload.readableBytes
        receiveWindow -= flowLength
        guard receiveWindow >= 0 else { throw Failure(code: .flowControlError) }
        let body = try H2Wire.unpadded(flags, payload)
        let endStream = flags & Flag.endStream != 0
        guard var s = streams[stream], !s.remoteEnded else {
            // Closed or half-closed (remote): its bytes still count on the connection.
            relay.callerDataDropped(flowLength)
            if streams[stream] == nil && resetHere.contains(stream) { return }   // late frames of a stream we reset
            return streamError(stream, .streamClosed)
        }
        s.receiveWindow -= flowLength
        guard s.receiveWindow >= 0 else {
            relay.callerDataDropped(flowLength)
            return streamError(stream, .flowControlError)
        }
        if body.readableBytes == 0 && !endStream {
            emptyDataRun += 1
            guard emptyDataRun <= Self.maxEmptyDataFrames else { throw Failure(code: .enhanceYourCalm) }
        } else {
            emptyDataRun = 0
        }
        if let left = s.contentLeft {
            let now = left - body.readableBytes
            guard now >= 0, !endStream || now == 0 else {
                relay.callerDataDropped(flowLength)
                return streamError(stream, .protocolError)
            }
            s.contentLeft = now
        }
        if endStream { s.remoteEnded = true }
        streams[stream] = s
        let padding = flags & Flag.padded != 0 ? flowLength - body.readableBytes - 1 : nil
        relay.fromDown(HTTP2Frame(streamID: HTTP2StreamID(stream),
                                  payload: .data(.init(data: .byteBuffer(body), endStream: endStream, paddingBytes: padding))))
        if endStream { closeIfDone(stream) }
    }

    private func headers(_ stream: Int32, _ block: ByteBuffer, endStream: Bool, dependency: Int32?) throws {
        var b = block
        // Decoded whatever becomes of the stream: the table is the connection's.
        let decoded: HPACKHeaders
        do { decoded = try decoder.decodeHeaders(from: &b) } catch { throw Failure(code: .compressionError) }
        if dependency == stream { return streamError(stream, .protocolError) }
        if var s = streams[stream] {
            // Trailers: they end the request, regular fields only.
            guard !s.remoteEnded else { return streamError(stream, .streamClosed) }
            guard endStream, H2Fields.validTrailers(decoded), s.contentLeft ?? 0 == 0 else {
                return streamError(stream, .protocolError)
            }
            s.remoteEnded = true
            streams[stream] = s
            relay.fromDown(HTTP2Frame(streamID: HTTP2StreamID(stream), payload: .headers(.init(headers: decoded, endStream: true))))
            return closeIfDone(stream)
        }
        if stream <= lastStream {
            if resetHere.contains(stream) { return }   // late frames of a stream we reset
            throw Failure(code: openedOnce.contains(stream) ? .streamClosed : .protocolError)
        }
        lastStream = stream
        guard !callerWentAway, streams.count < Self.maxConcurrentStreams else { return streamError(stream, .refusedStream) }
        guard H2Fields.validRequest(decoded), let length = H2Fields.contentLength(of: decoded), !endStream || (length ?? 0) == 0 else {
            return streamError(stream, .protocolError)
        }
        unearnedWindowUpdates -= 1
        openedOnce.insert(stream)
        streams[stream] = Stream(sendWindow: peerInitialWindow, remoteEnded: endStream, contentLeft: length)
        relay.fromDown(HTTP2Frame(streamID: HTTP2StreamID(stream), payload: .headers(.init(headers: decoded, endStream: endStream))))
    }

    private func settings(_ payload: ByteBuffer) throws {
        var p = payload
        while let id = p.readInteger(as: UInt16.self), let value = p.readInteger(as: UInt32.self) {
            switch id {
            case 0x1:   // HEADER_TABLE_SIZE: our encoder's table may not exceed it
                do { try writer.encoder.setDynamicTableSize(min(Int(value), HPACKEncoder.defaultDynamicTableSize)) } catch {
                    throw Failure(code: .internalError)
                }
            case 0x2:
                guard value <= 1 else { throw Failure(code: .protocolError) }
            case 0x4:
                guard value <= UInt32(H2Wire.maxWindow) else { throw Failure(code: .flowControlError) }
                let delta = Int(value) - peerInitialWindow
                peerInitialWindow = Int(value)
                for key in Array(streams.keys) {
                    streams[key]!.sendWindow += delta
                    guard streams[key]!.sendWindow <= H2Wire.maxWindow else { throw Failure(code: .flowControlError) }
                }
                if delta > 0 { for key in Array(streams.keys) { drain(key) } }
            case 0x5:
                guard value >= 1 << 14, value < 1 << 24 else { throw Failure(code: .protocolError) }
                peerMaxFrameSize = Int(value)
            default:
                break   // MAX_CONCURRENT_STREAMS (we push nothing), MAX_HEADER_LIST_SIZE (advisory), unknown
            }
        }
    }

    private func windowUpdate(from stream: Int32, _ n: Int) throws {
        if stream == 0 {
            guard n > 0 else { throw Failure(code: .protocolError) }
            sendWindow += n
            guard sendWindow <= H2Wire.maxWindow else { throw Failure(code: .flowControlError) }
            for key in Array(streams.keys) where !(streams[key]?.queue.isEmpty ?? true) { drain(key) }
            return
        }
        guard stream <= lastStream else { throw Failure(code: .protocolError) }
        guard var s = streams[stream] else { return }
        guard n > 0 else { return streamError(stream, .protocolError) }
        s.sendWindow += n
        guard s.sendWindow <= H2Wire.maxWindow else { return streamError(stream, .flowControlError) }
        streams[stream] = s
        drain(stream)
    }

    /// Rapid reset (CVE-2023-44487): RST_STREAM frames counted per 30 s.
    private func countReset() throws {
        let now = NIODeadline.now()
        if now - resetsSince > Self.resetWindow {
            resetsSince = now
            resets = 0
        }
        resets += 1
        guard resets <= Self.maxResets else { throw Failure(code: .enhanceYourCalm) }
    }

    /// A SETTINGS or PING answer: at most so many between two flushes
    /// after which the caller's channel still took everything (as NIO's
    /// handler buffered control frames while its channel was unwritable).
    private func answered() throws {
        controlAnswersUnread += 1
        guard controlAnswersUnread <= Self.maxControlAnswersUnread else { throw Failure(code: .enhanceYourCalm) }
    }

    /// RST_STREAM to the caller for a stream error of its own making.
    private func streamError(_ stream: Int32, _ code: HTTP2ErrorCode) {
        glitches += 1
        guard glitches <= Self.maxGlitches else { return fail(.enhanceYourCalm) }
        writer.rstStream(stream, code)
        rememberReset(stream)
        close(stream, reason: code)
    }

    private func rememberReset(_ stream: Int32) { resetHere.insert(stream) }

    /// A connection error: GOAWAY, then the connection (and the workload's) closes.
    private func fail(_ code: HTTP2ErrorCode) {
        guard !failed, let context else { return }
        failed = true
        writer.goAway(last: lastStream, code)
        let written = context.eventLoop.makePromise(of: Void.self)
        emit(promise: written)
        context.flush()
        written.futureResult.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    // MARK: sending

    private func enqueue(_ stream: Int32, _ item: Outgoing) {
        guard streams[stream] != nil, !failed else { return drop([item]) }
        streams[stream]!.queue.append(item)
        drain(stream)
    }

    /// Writes what a stream's queue holds as far as the windows allow.
    private func drain(_ stream: Int32) {
        while let s = streams[stream], let first = s.queue.first, !failed, context != nil {
            switch first {
            case .headers(let h, let endStream):
                streams[stream]!.queue.removeFirst()
                streams[stream]!.localEnded = endStream
                do { try writer.headers(stream, h, endStream: endStream, maxFrameSize: peerMaxFrameSize) } catch {
                    return fail(.internalError)
                }
            case .data(var d, let endStream, let source, let credit):
                let room = min(s.sendWindow, sendWindow)
                let n = d.readableBytes
                if n > 0 && room <= 0 { return }
                if n > room {
                    // Part of it now; the rest when the windows open.
                    let part = d.readSlice(length: room)!
                    streams[stream]!.queue[0] = .data(d, endStream: endStream, source: source, credit: credit)
                    streams[stream]!.sendWindow -= room
                    sendWindow -= room
                    writeData(stream, part, endStream: false, source: nil, credit: 0)
                    continue
                }
                streams[stream]!.queue.removeFirst()
                streams[stream]!.sendWindow -= n
                sendWindow -= n
                streams[stream]!.localEnded = endStream
                writeData(stream, d, endStream: endStream, source: source, credit: credit)
            }
        }
        closeIfDone(stream)
    }

    private func closeIfDone(_ stream: Int32) {
        guard let s = streams[stream], s.localEnded, s.remoteEnded, s.queue.isEmpty else { return }
        close(stream, reason: nil)
    }

    /// The stream leaves; what it still held is dropped.
    private func close(_ stream: Int32, reason: HTTP2ErrorCode?) {
        guard let s = streams.removeValue(forKey: stream) else { return }
        drop(s.queue)
        relay.streamClosed(HTTP2StreamID(stream), onDown: true, reason: reason)
    }

    /// Frames that will not be sent: the workload's windows get their bytes back.
    private func drop(_ items: [Outgoing]) {
        for item in items {
            if case .data(_, _, let source?, let credit) = item { relay.responseDataTaken(source: source, credit, sent: false, streamOpen: false) }
        }
    }

    /// A DATA frame; with a `source`, the workload's bytes are given back
    /// at once while the caller's channel takes more, else once written.
    private func writeData(_ stream: Int32, _ data: ByteBuffer, endStream: Bool, source: HTTP2StreamID?, credit: Int) {
        guard let context else { return }
        unearnedWindowUpdates -= 2   // (a stream's and the connection's window)
        let large = writer.data(stream, data, endStream: endStream)
        guard let source, !context.channel.isWritable else {
            if let large {
                emit()
                context.write(wrapOutboundOut(large), promise: nil)
                unflushed = true
            }
            if let source { relay.responseDataTaken(source: source, credit, sent: true, streamOpen: !endStream) }
            return
        }
        // The caller reads slower than the workload answers: the
        // workload's window comes back once the socket took these bytes.
        let written = context.eventLoop.makePromise(of: Void.self)
        if let large {
            emit()
            context.write(wrapOutboundOut(large), promise: written)
        } else {
            emit(promise: written)
        }
        unflushed = true
        let relay = self.relay
        written.futureResult.whenComplete { result in
            relay.responseDataTaken(source: source, credit, sent: (try? result.get()) != nil, streamOpen: !endStream)
        }
    }

    /// Hands this tick's frames to the channel.
    private func emit(promise: EventLoopPromise<Void>? = nil) {
        guard let context else { promise?.fail(ChannelError.ioOnClosedChannel); return }
        guard let gathered = writer.take(allocator: context.channel.allocator) else {
            promise?.succeed()
            return
        }
        context.write(wrapOutboundOut(gathered), promise: promise)
        unflushed = true
    }
}

/// Stream IDs remembered up to a bound (the oldest are forgotten first).
struct RecentStreams {
    static let capacity = 4096
    private var members = Set<Int32>()
    private var order: [Int32] = []
    private var head = 0

    func contains(_ stream: Int32) -> Bool { members.contains(stream) }

    mutating func insert(_ stream: Int32) {
        guard members.insert(stream).inserted else { return }
        if order.count < Self.capacity {
            order.append(stream)
        } else {
            members.remove(order[head])
            order[head] = stream
            head = (head + 1) % Self.capacity
        }
    }
}
