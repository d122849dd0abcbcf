import NIOCore
import NIOHPACK
import NIOHTTP2

/// The workload's side of the HTTP/2 relay: one client connection to the
/// workload, framed here instead of by a second NIO HTTP/2 handler.
///
/// Why: running NIO's state machine a second time towards a local
/// workload cost ~18% of the proxy's samples under h2load (the caller's
/// side, `H2CallerConnection`, is the agent's own too now; both share
/// `H2Wire`'s reader and writer). What this side does, per RFC 9113:
/// HPACK (NIO's encoder and decoder, one table each way), SETTINGS and
/// their acknowledgement, PING answers, GOAWAY (streams the workload did
/// not take are refused to the caller, so it may retry them), both flow
/// control directions, the workload's concurrent-stream limit (requests
/// past it wait their turn), a response's framing (a head before any DATA,
/// trailers that end the stream, content-length kept) and every frame's
/// size and stream rules. A stream error resets that stream (the relay
/// resets the caller's); a connection error sends GOAWAY and closes, which
/// closes the caller's connection too.
///
/// Request DATA the workload's windows cannot take yet waits here, and the
/// caller's window is given back only once it is written: a caller cannot
/// make the agent hold more than the windows it was granted.
final class H2WorkloadConnection: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    typealias Flag = H2Wire.Flag
    typealias Failure = H2Wire.ConnectionError

    private enum Outgoing {
        case headers(HPACKHeaders, endStream: Bool)
        /// `credit`: the caller's flow-control bytes to give back once written.
        case data(ByteBuffer, endStream: Bool, source: HTTP2StreamID, credit: Int)
    }

    private enum ResponseState { case awaitingHead, body, ended }

    private struct Stream {
        var opened = false
        var sendWindow: Int
        var receiveWindow: Int
        var localEnded = false
        var remoteEnded = false
        var response = ResponseState.awaitingHead
        var isHead: Bool
        /// Body bytes still due by the response's content-length.
        var contentLeft: Int?
        var queue: [Outgoing] = []
    }

    private let relay: H2Relay
    private var context: ChannelHandlerContext?
    private var writer = H2FrameWriter(allocator: H2Relay.allocator)
    private var reader = H2FrameReader(maxFrameSize: H2Relay.maxFrameSize)
    private var decoder = HPACKDecoder(allocator: H2Relay.allocator, maxDynamicTableSize: HPACKDecoder.maxDynamicTableSize,
                                       maxHeaderListSize: H2Relay.maxHeaderListSize)
    private var streams: [Int32: Stream] = [:]
    /// Streams allocated but not opened: past the workload's limit.
    private var waiting: [Int32] = []
    private var waitingStart = 0
    private var active = 0
    private var nextID: Int32 = 1
    private var peerInitialWindow = 65_535
    private var peerMaxFrameSize = 1 << 14
    private var peerMaxStreams = Int.max
    private var sendWindow = 65_535
    private var receiveWindow = 65_535
    /// The last stream of a GOAWAY from the workload: none above it is processed.
    private var goneAway: Int32?
    private var sawSettings = false
    private var continuation: (stream: Int32, endStream: Bool, block: ByteBuffer)?
    private var unflushed = false
    private var failed = false
    private var prefaceSent = false

    init(relay: H2Relay) { self.relay = relay }

    // MARK: the relay's requests

    /// Opens a stream for a request (or queues it past the workload's
    /// limit). Nil when the connection takes no more streams (IDs used up,
    /// GOAWAY, failed): the caller's stream is then refused.
    func startRequest(_ headers: HPACKHeaders, endStream: Bool, isHead: Bool) -> HTTP2StreamID? {
        guard !failed, goneAway == nil, nextID < Int32.max - 2 else { return nil }
        let id = nextID
        nextID += 2
        var s = Stream(sendWindow: peerInitialWindow, receiveWindow: H2Relay.streamWindow, isHead: isHead)
        s.queue.append(.headers(headers, endStream: endStream))
        streams[id] = s
        if active < peerMaxStreams && waitingStart == waiting.count {
            open(id)
        } else {
            waiting.append(id)
        }
        return HTTP2StreamID(id)
    }

    /// Trailers of a request.
    func sendHeaders(_ id: HTTP2StreamID, _ headers: HPACKHeaders, endStream: Bool) {
        enqueue(Int32(id), .headers(headers, endStream: endStream))
    }

    /// Request body bytes: written as far as the workload's windows allow,
    /// the rest when they open. The relay's `requestDataTaken` gives the
    /// caller's window back once they are written (or dropped).
    func sendData(_ id: HTTP2StreamID, _ data: ByteBuffer, endStream: Bool, source: HTTP2StreamID, credit: Int) {
        enqueue(Int32(id), .data(data, endStream: endStream, source: source, credit: credit))
    }

    /// The relay is done with a stream (the caller reset it, or its
    /// response was refused): RST_STREAM if the workload knows it.
    func reset(_ id: HTTP2StreamID, _ code: HTTP2ErrorCode) {
        let key = Int32(id)
        guard let s = streams.removeValue(forKey: key) else { return }
        if s.opened {
            active -= 1
            writer.rstStream(key, code)
        }
        drop(s.queue)
        openWaiting()
    }

    /// Gives the workload `n` bytes of window (the connection's, and the
    /// stream's when one is named).
    func windowUpdate(stream: HTTP2StreamID?, _ n: Int) {
        guard !failed else { return }
        if let stream {
            let key = Int32(stream)
            guard streams[key] != nil else { return }
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
    }

    // MARK: the channel

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        relay.up = self
        if context.channel.isActive { sendPreface() }
    }

    func channelActive(context: ChannelHandlerContext) {
        sendPreface()
        context.fireChannelActive()
    }

    private func sendPreface() {
        guard !prefaceSent else { return }
        prefaceSent = true
        writer.out.writeBytes(L7ProtocolSniffer.preface)
        // ENABLE_PUSH 0, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE.
        let settings: [(UInt16, Int)] = [(2, 0), (4, H2Relay.streamWindow), (5, H2Relay.maxFrameSize), (6, H2Relay.maxHeaderListSize)]
        writer.frame(.settings, 0, 0) { b in
            for (id, value) in settings {
                b.writeInteger(id)
                b.writeInteger(UInt32(value))
            }
        }
        // A connection window larger than HTTP/2's initial 64 KiB.
        receiveWindow = H2Relay.connectionWindow
        writer.windowUpdate(0, H2Relay.connectionWindow - 65_535)
        flush()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        reader.append(unwrapInboundIn(data), allocator: context.channel.allocator)
        do {
            while !failed, let f = try reader.next() {
                try frame(f.type, f.flags, f.stream, f.payload)
            }
        } catch let f as Failure {
            fail(f.code)
        } catch {
            fail(.internalError)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        relay.down?.flush()
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
        if relay.up === self { relay.up = nil }
        context = nil
        streams.removeAll()
        waiting.removeAll()
        continuation = nil
        reader.reset()
    }

    // MARK: frames from the workload

    private func frame(_ typeByte: UInt8, _ flags: UInt8, _ stream: Int32, _ payload: ByteBuffer) throws {
        if let c = continuation {
            guard typeByte == H2Wire.FrameType.continuation.rawValue, stream == c.stream else { throw Failure(code: .protocolError) }
            var block = c.block
            var p = payload
            guard block.readableBytes + p.readableBytes <= H2Wire.maxHeaderBlock else { throw Failure(code: .enhanceYourCalm) }
            block.writeBuffer(&p)
            if flags & Flag.endHeaders != 0 {
                continuation = nil
                try headers(stream, block, endStream: c.endStream)
            } else {
                continuation = (stream, c.endStream, block)
            }
            return
        }
        guard let type = H2Wire.FrameType(rawValue: typeByte) else { return }   // unknown types are ignored
        guard sawSettings || type == .settings else { throw Failure(code: .protocolError) }   // the server's preface
        switch type {
        case .data:
            try data(flags, stream, payload)
        case .headers:
            guard stream != 0 else { throw Failure(code: .protocolError) }
            var p = try H2Wire.unpadded(flags, payload)
            if flags & Flag.priority != 0 {
                guard p.readableBytes >= 5 else { throw Failure(code: .protocolError) }
                p.moveReaderIndex(forwardBy: 5)
            }
            if flags & Flag.endHeaders != 0 {
                try headers(stream, p, endStream: flags & Flag.endStream != 0)
            } else {
                continuation = (stream, flags & Flag.endStream != 0, p)
            }
        case .priority:
            guard stream != 0 else { throw Failure(code: .protocolError) }
            guard payload.readableBytes == 5 else { throw Failure(code: .frameSizeError) }
        case .rstStream:
            guard stream != 0, isKnown(stream) else { throw Failure(code: .protocolError) }
            guard payload.readableBytes == 4 else { throw Failure(code: .frameSizeError) }
            let code = HTTP2ErrorCode(networkCode: Int(payload.getInteger(at: payload.readerIndex, as: UInt32.self)!))
            guard let s = streams.removeValue(forKey: stream) else { return }
            if s.opened { active -= 1 }
            drop(s.queue)
            relay.fromUp(HTTP2Frame(streamID: HTTP2StreamID(stream), payload: .rstStream(code)))
            relay.streamClosed(HTTP2StreamID(stream), onDown: false, reason: code)
            openWaiting()
        case .settings:
            guard stream == 0 else { throw Failure(code: .protocolError) }
            if flags & Flag.ack != 0 {
                guard payload.readableBytes == 0 else { throw Failure(code: .frameSizeError) }
                return
            }
            guard payload.readableBytes % 6 == 0 else { throw Failure(code: .frameSizeError) }
            try settings(payload)
            sawSettings = true
            writer.frame(.settings, Flag.ack, 0) { _ in }
        case .pushPromise:
            throw Failure(code: .protocolError)   // we announced ENABLE_PUSH 0
        case .ping:
            guard stream == 0 else { throw Failure(code: .protocolError) }
            guard payload.readableBytes == 8 else { throw Failure(code: .frameSizeError) }
            if flags & Flag.ack == 0 {
                var p = payload
                writer.frame(.ping, Flag.ack, 0) { $0.writeBuffer(&p) }
            }
        case .goAway:
            guard stream == 0 else { throw Failure(code: .protocolError) }
            guard payload.readableBytes >= 8 else { throw Failure(code: .frameSizeError) }
            goAway(last: Int32(bitPattern: payload.getInteger(at: payload.readerIndex, as: UInt32.self)! & 0x7FFF_FFFF))
        case .windowUpdate:
            guard payload.readableBytes == 4 else { throw Failure(code: .frameSizeError) }
            let n = Int(payload.getInteger(at: payload.readerIndex, as: UInt32.self)! & 0x7FFF_FFFF)
            try windowUpdate(from: stream, n)
        case .continuation:
            throw Failure(code: .protocolError)   // none expected
        }
    }

    /// A stream the workload may name: one we opened (it may have closed since).
    private func isKnown(_ stream: Int32) -> Bool {
        stream & 1 == 1 && stream < nextID && (streams[stream]?.opened ?? true)
    }

    private func data(_ flags: UInt8, _ stream: Int32, _ payload: ByteBuffer) throws {
        guard stream != 0, isKnown(stream) else { throw Failure(code: .protocolError) }
        let flowLength = payload.readableBytes
        receiveWindow -= flowLength
        guard receiveWindow >= 0 else { throw Failure(code: .flowControlError) }
        let body = try H2Wire.unpadded(flags, payload)
        let endStream = flags & Flag.endStream != 0
        guard var s = streams[stream] else {
            // A stream closed here (reset): its bytes still count on the connection.
            relay.acknowledgeUp(flowLength)
            return
        }
        guard !s.remoteEnded else { return streamError(stream, .streamClosed, connectionCredit: flowLength) }
        s.receiveWindow -= flowLength
        guard s.receiveWindow >= 0 else { return streamError(stream, .flowControlError, connectionCredit: flowLength) }
        guard s.response == .body else { return streamError(stream, .protocolError, connectionCredit: flowLength) }
        if let left = s.contentLeft {
            let now = left - body.readableBytes
            guard now >= 0, !endStream || now == 0 else { return streamError(stream, .protocolError, connectionCredit: flowLength) }
            s.contentLeft = now
        }
        if endStream {
            s.remoteEnded = true
            s.response = .ended
        }
        streams[stream] = s
        relay.fromUp(HTTP2Frame(streamID: HTTP2StreamID(stream), payload: .data(.init(data: .byteBuffer(body), endStream: endStream))),
                     credit: flowLength)
        if endStream { closeIfDone(stream) }
    }

    private func headers(_ stream: Int32, _ block: ByteBuffer, endStream: Bool) throws {
        guard isKnown(stream) else { throw Failure(code: .protocolError) }
        var b = block
        // Decoded even for a stream closed here: the table is the connection's.
        let decoded: HPACKHeaders
        do { decoded = try decoder.decodeHeaders(from: &b) } catch { throw Failure(code: .compressionError) }
        guard var s = streams[stream] else { return }
        guard !s.remoteEnded else { return streamError(stream, .streamClosed) }
        switch s.response {
        case .awaitingHead:
            let status = decoded.first(name: ":status") ?? ""
            if status.utf8.first == UInt8(ascii: "1") {
                guard !endStream else { return streamError(stream, .protocolError) }   // 1xx: a final head follows
            } else {
                guard let left = contentLength(decoded, status: status, isHead: s.isHead) else {
                    return streamError(stream, .protocolError)
                }
                guard !endStream || (left ?? 0) == 0 else { return streamError(stream, .protocolError) }
                s.contentLeft = left
                s.response = endStream ? .ended : .body
            }
        case .body:
            guard endStream, s.contentLeft ?? 0 == 0 else { return streamError(stream, .protocolError) }   // trailers end it
            s.response = .ended
        case .ended:
            return streamError(stream, .protocolError)
        }
        if endStream { s.remoteEnded = true }
        streams[stream] = s
        relay.fromUp(HTTP2Frame(streamID: HTTP2StreamID(stream), payload: .headers(.init(headers: decoded, endStream: endStream))))
        if endStream { closeIfDone(stream) }
    }

    /// Body bytes a response's head promises: .some(nil) when it says
    /// nothing, nil when its content-length is malformed or contradicts
    /// itself (RFC 9113 §8.1.1).
    private func contentLength(_ h: HPACKHeaders, status: String, isHead: Bool) -> Int?? {
        if isHead || status == "304" { return .some(0) }
        return H2Fields.contentLength(of: h)
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
            case 0x3:
                peerMaxStreams = Int(value)
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
                break   // MAX_HEADER_LIST_SIZE is advisory; unknown settings are ignored
            }
        }
        openWaiting()
    }

    private func windowUpdate(from stream: Int32, _ n: Int) throws {
        if stream == 0 {
            guard n > 0 else { throw Failure(code: .protocolError) }
            sendWindow += n
            guard sendWindow <= H2Wire.maxWindow else { throw Failure(code: .flowControlError) }
            for key in Array(streams.keys) where !(streams[key]?.queue.isEmpty ?? true) { drain(key) }
            return
        }
        guard isKnown(stream) else { throw Failure(code: .protocolError) }
        guard var s = streams[stream] else { return }
        guard n > 0 else { return streamError(stream, .protocolError) }
        s.sendWindow += n
        guard s.sendWindow <= H2Wire.maxWindow else { return streamError(stream, .flowControlError) }
        streams[stream] = s
        drain(stream)
    }

    /// Streams above the workload's last one were never processed: refused
    /// to the caller (who may retry them elsewhere).
    private func goAway(last: Int32) {
        goneAway = min(goneAway ?? last, last)
        for key in streams.keys.sorted() where key > last {
            guard let s = streams.removeValue(forKey: key) else { continue }
            if s.opened { active -= 1 }
            drop(s.queue)
            relay.streamClosed(HTTP2StreamID(key), onDown: false, reason: .refusedStream)
        }
    }

    /// RST_STREAM to the workload; the relay resets the caller's stream.
    private func streamError(_ stream: Int32, _ code: HTTP2ErrorCode, connectionCredit: Int = 0) {
        if connectionCredit > 0 { relay.acknowledgeUp(connectionCredit) }
        guard let s = streams.removeValue(forKey: stream) else { return }
        if s.opened { active -= 1 }
        writer.rstStream(stream, code)
        drop(s.queue)
        relay.streamClosed(HTTP2StreamID(stream), onDown: false, reason: code)
        openWaiting()
    }

    /// A connection error: GOAWAY, then the connection (and the caller's) closes.
    private func fail(_ code: HTTP2ErrorCode) {
        guard !failed, let context else { return }
        failed = true
        writer.goAway(last: 0, code)
        flush()
        context.close(promise: nil)
    }

    // MARK: sending

    private func enqueue(_ stream: Int32, _ item: Outgoing) {
        guard streams[stream] != nil else { return drop([item]) }
        streams[stream]!.queue.append(item)
        drain(stream)
    }

    private func open(_ stream: Int32) {
        guard streams[stream] != nil else { return }
        streams[stream]!.opened = true
        active += 1
        drain(stream)
    }

    private func openWaiting() {
        while active < peerMaxStreams, waitingStart < waiting.count {
            let id = waiting[waitingStart]
            waitingStart += 1
            if streams[id] != nil { open(id) }
        }
        if waitingStart == waiting.count {
            waiting.removeAll(keepingCapacity: true)
            waitingStart = 0
        }
    }

    /// Writes what a stream's queue holds as far as the windows allow.
    private func drain(_ stream: Int32) {
        while let s = streams[stream], s.opened, let first = s.queue.first, !failed, context != nil {
            switch first {
            case .headers(let h, let endStream):
                streams[stream]!.queue.removeFirst()
                streams[stream]!.localEnded = endStream
                writeHeaders(stream, h, endStream: endStream)
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
                    writeData(stream, part, endStream: false, tookBy: nil)
                    continue
                }
                streams[stream]!.queue.removeFirst()
                streams[stream]!.sendWindow -= n
                sendWindow -= n
                streams[stream]!.localEnded = endStream
                writeData(stream, d, endStream: endStream, tookBy: (source, credit, !endStream))
            }
        }
        closeIfDone(stream)
    }

    private func closeIfDone(_ stream: Int32) {
        guard let s = streams[stream], s.localEnded, s.remoteEnded, s.queue.isEmpty else { return }
        streams[stream] = nil
        if s.opened { active -= 1 }
        relay.streamClosed(HTTP2StreamID(stream), onDown: false, reason: nil)
        openWaiting()
    }

    /// Frames that will not be sent: the caller's window gets their bytes back.
    private func drop(_ items: [Outgoing]) {
        for item in items {
            if case .data(_, _, let source, let credit) = item { relay.requestDataTaken(source: source, credit, sent: false, streamOpen: false) }
        }
    }

    private func writeHeaders(_ stream: Int32, _ headers: HPACKHeaders, endStream: Bool) {
        do { try writer.headers(stream, headers, endStream: endStream, maxFrameSize: peerMaxFrameSize) } catch {
            fail(.internalError)
        }
    }

    /// A DATA frame; `tookBy` names the caller's bytes to acknowledge once
    /// written (nil: the relay did or does it itself): at once while the
    /// workload's channel takes more, else once the socket took them.
    private func writeData(_ stream: Int32, _ data: ByteBuffer, endStream: Bool,
                           tookBy: (source: HTTP2StreamID, credit: Int, streamOpen: Bool)?) {
        guard let context else { return }
        let large = writer.data(stream, data, endStream: endStream)
        guard let took = tookBy, !context.channel.isWritable else {
            if let large {
                emit()
                context.write(wrapOutboundOut(large), promise: nil)
                unflushed = true
            }
            if let t = tookBy { relay.requestDataTaken(source: t.source, t.credit, sent: true, streamOpen: t.streamOpen) }
            return
        }
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
            relay.requestDataTaken(source: took.source, took.credit, sent: (try? result.get()) != nil, streamOpen: took.streamOpen)
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
